"""The app shell: header, the four tabs, and what they share."""
from __future__ import annotations

import gradio as gr

from . import api, caption_tab, dataset_tab, test_tab, train_tab

CSS = """
#run-progress p { margin: 4px 0; }
.run-error { color: #b91c1c; }
footer { display: none !important; }
"""


# The Test tab's set of images lives in the page (Gradio state): leaving or reloading the page with images not yet
# exported would drop them, so the browser asks first (its own "Leave site?" prompt).
HEAD = """<script>
window.loraLabUnsaved = () => {
  const set = document.querySelector("#test-session");
  return Boolean(set && set.innerText.startsWith("This set:") && !set.innerText.includes("exported"));
};
window.addEventListener("beforeunload", (e) => {
  if (window.loraLabUnsaved()) {
    e.preventDefault();
    e.returnValue = "";
  }
});
</script>"""


def build_app(ctx) -> gr.Blocks:
    # On a Space, files visitors upload or are sent go after two hours (Gradio's cache), so they can't fill the disk.
    with gr.Blocks(title="LoRA Lab", delete_cache=(3600, 7200) if ctx.space else None) as app:
        if ctx.space:
            from .space import MAX_IMAGES, MAX_STEPS

            gr.Markdown(f"# LoRA Lab — demo\nTrain a LoRA in your browser and try it. This shared demo takes "
                        f"**uploaded images only** (at most {MAX_IMAGES}), the built-in demo models, and at most "
                        f"{MAX_STEPS} steps. Your files and runs are visible only to this browser session: download "
                        "your results (run history, export zip) or push them to your own Hugging Face account.")
        else:
            where = ("Your datasets, runs and LoRAs are in a workspace of your own on the server, which only you "
                     "see." if ctx.per_user else f"Workspace: `{ctx.workspace}`")
            gr.Markdown(f"# LoRA Lab\nTrain LoRA adapters for Stable Diffusion and try them right away. {where}")
        with gr.Tabs():
            with gr.Tab("1 · Dataset", id="dataset"):
                data = dataset_tab.build(ctx)
            with gr.Tab("2 · Caption", id="caption"):
                caption_tab.build(ctx, data)
            with gr.Tab("3 · Train", id="train"):
                train_tab.build(ctx, data)
            with gr.Tab("4 · Test", id="test") as test:
                tests = test_tab.build(ctx)
        test.select(tests["on_refresh"], tests["first"], tests["lists"], show_progress="hidden")  # current on opening
        api.build(ctx)
    return app
