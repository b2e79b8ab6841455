"""Dataset tab: pick a folder or a Hugging Face dataset (or upload images), see every image and problem."""
from __future__ import annotations

import gradio as gr

from trainer.errors import LoraLabError

from . import access
from .errors import guarded, message as error_text
from .uploads import save_uploads

PAGE = 12
THUMB_SIDE = 384  # the gallery shows previews: a large photo is never sent (or decoded) whole


def load_dataset(ctx, source: str, split: str, image_col: str, caption_col: str):
    from trainer.data.sources import load_dataset_source
    from trainer.data.summary import summarize

    ds = load_dataset_source(access.dataset_source(ctx, source), split or "train", image_col or "image", caption_col or "text")
    return ds, summarize(ds)


def counts_markdown(s: dict) -> str:
    return (f"**{s['images']} images** ({s['layout']}) · {s['captioned']} captioned · "
            f"{s['missing_captions']} missing captions · {s['repeats']} per epoch with repeats · "
            f"{len(s['problems'])} problems · shown below {PAGE} to a page, "
            f"{max(1, -(-s['images'] // PAGE))} page{'s' if s['images'] > PAGE else ''}")


def gallery_page(ds, page: int):
    """Previews of one page; an image that cannot be read shows as a grey square saying why."""
    from PIL import Image

    from trainer.data.images import UnreadableImage, open_image

    out = []
    for it in ds.items[page * PAGE:(page + 1) * PAGE]:
        try:
            img = open_image(it.image_path if it.image_path is not None else it.load(), max_side=THUMB_SIDE)
            out.append((img, f"{it.name}: {it.caption or '(no caption)'}"))
        except UnreadableImage as e:
            out.append((Image.new("RGB", (64, 64), (200, 200, 200)), f"{it.name}: ⚠️ {e}"))
    return out


def pages(ds) -> int:
    return max(1, -(-len(ds.items) // PAGE))


def build(ctx):
    """Returns the dataset source textbox, which other tabs read."""
    state = gr.State(None)  # the loaded trainer Dataset
    gr.Markdown("Pick a folder of images with `.txt` captions, kohya `N_name` folders, `image/` + `text/` pairs, "
                "or a Hugging Face dataset. Or upload images below, or make the demo dataset to try things out.")
    with gr.Row():
        source = gr.Textbox(label="Dataset folder or Hugging Face dataset", scale=4, elem_id="dataset-source",
                            placeholder="/path/to/images  or  owner/dataset  or  datasets/demo")
        load_btn = gr.Button("Load", variant="primary", scale=1, elem_id="dataset-load")
        demo_btn = gr.Button("Make demo dataset", scale=1, elem_id="dataset-demo")
        copy_btn = gr.Button("Copy into my workspace", scale=1, elem_id="dataset-copy")
    with gr.Accordion("Hugging Face dataset columns", open=False):
        with gr.Row():
            split = gr.Dropdown(["train"], value="train", label="Split", allow_custom_value=True)
            image_col = gr.Dropdown(["image"], value="image", label="Image column", allow_custom_value=True)
            caption_col = gr.Dropdown(["text"], value="text", label="Caption column", allow_custom_value=True)
            cols_btn = gr.Button("Read columns")
    with gr.Accordion("Upload images or a zip into a new dataset", open=False):
        upload = gr.File(file_count="multiple", label="Images, .txt captions or a .zip")
        upload_name = gr.Textbox(label="New dataset name", placeholder="my-dataset")
        upload_btn = gr.Button("Create dataset from uploads")
    message = gr.Markdown(elem_id="dataset-message")
    counts = gr.Markdown(elem_id="dataset-counts")
    with gr.Row():
        prev_btn = gr.Button("◀ Previous page", size="sm")
        page = gr.Number(value=1, label="Page", precision=0, minimum=1, scale=0, min_width=100)
        next_btn = gr.Button("Next page ▶", size="sm")
    gallery = gr.Gallery(label="Images and captions", columns=6, fit_columns=False, height="auto",
                         elem_id="dataset-gallery")
    with gr.Row():
        sizes = gr.Dataframe(headers=["size", "images"], label="Image sizes", interactive=False)
        buckets = gr.Dataframe(headers=["bucket at 512", "images"], label="Aspect buckets", interactive=False)
    problems = gr.Dataframe(headers=["file", "problem"], label="Problems", interactive=False, elem_id="dataset-problems")

    @guarded(7)
    def on_load(src, sp, ic, cc):
        ds, s = load_dataset(ctx, src, sp, ic, cc)
        return ("", counts_markdown(s), gallery_page(ds, 0), s["sizes"], s["buckets"],
                s["problems"] or [["—", "no problems found"]], ds)

    outs = [message, counts, gallery, sizes, buckets, problems, state]
    load_btn.click(on_load, [source, split, image_col, caption_col], outs).then(lambda: 1, None, page)
    source.submit(on_load, [source, split, image_col, caption_col], outs)

    def on_demo():
        from trainer.data.demo import make_demo_dataset

        path = make_demo_dataset(ctx.workspace / "datasets" / "demo")
        return str(path)

    demo_btn.click(on_demo, None, source).then(on_load, [source, split, image_col, caption_col], outs)

    @guarded(4)
    def on_columns(src):
        from trainer.data.sources import hf_columns

        splits, cols = hf_columns(access.dataset_source(ctx, src))
        img = next((c for c in cols if "image" in c.lower()), cols[0])
        cap = next((c for c in cols if c in ("text", "caption", "en_text", "prompt")), cols[-1])
        return ("", gr.update(choices=splits, value=splits[0]), gr.update(choices=cols, value=img),
                gr.update(choices=cols, value=cap))

    cols_btn.click(on_columns, source, [message, split, image_col, caption_col])

    @guarded(9)
    def on_upload(files, name):
        # Saves and loads in one step: a refused upload shows its reason and leaves the loaded dataset as it was.
        dest = save_uploads(ctx, files, name)
        return loaded(dest, f"Saved the upload as `datasets/{dest.name}`.")

    def loaded(dest, note):
        """The dataset just written into the workspace, loaded (its outputs as on_upload's)."""
        from trainer.data.sources import load_dataset_source
        from trainer.data.summary import summarize

        try:
            ds = load_dataset_source(str(dest))
        except LoraLabError as e:
            return (f"{note} {error_text(e)}", str(dest), *[gr.skip()] * 7)
        s = summarize(ds)
        return (note, str(dest), counts_markdown(s), gallery_page(ds, 0), s["sizes"], s["buckets"],
                s["problems"] or [["—", "no problems found"]], ds, 1)

    upload_btn.click(on_upload, [upload, upload_name], [message, source, *outs[1:], page])

    @guarded(9)
    def on_copy(src):
        """The folder typed above (a shared class dataset, read-only here) copied into the caller's workspace."""
        from pathlib import Path

        from .uploads import copy_dataset

        if not (src or "").strip():
            raise LoraLabError("No dataset given.", "Type the folder to copy above (the one your teacher named).")
        folder = Path(access.dataset_source(ctx, src))
        if not folder.is_dir():
            raise LoraLabError(f"Only a folder of images can be copied ({src.strip()[:80]} is not one here).",
                               "Give the folder your images are in.")
        if folder.resolve().is_relative_to(ctx.workspace.resolve()):  # copies of copies would only fill the disk
            raise LoraLabError("This folder is in your workspace already.", "Load it and edit its captions as it is.")
        dest = copy_dataset(ctx, folder)
        return loaded(dest, f"Copied into your workspace as `datasets/{dest.name}`: its captions are yours to edit.")

    copy_btn.click(on_copy, source, [message, source, *outs[1:], page])

    def turn(ds, p, delta):
        if ds is None:
            return gr.skip(), 1
        p = min(max(1, int(p or 1) + delta), pages(ds))
        return gallery_page(ds, p - 1), p

    prev_btn.click(lambda ds, p: turn(ds, p, -1), [state, page], [gallery, page])
    next_btn.click(lambda ds, p: turn(ds, p, 1), [state, page], [gallery, page])
    page.submit(lambda ds, p: turn(ds, p, 0), [state, page], [gallery, page])
    return {"source": source, "split": split, "image_col": image_col, "caption_col": caption_col, "state": state}
