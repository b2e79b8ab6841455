"""The whole workflow in a real browser (Debian's chromium driven by Playwright) against the real app.

Load a folder → edit captions → train and watch loss and samples → stop → resume → refresh and
re-attach → compare with the base model → export the zip. Screenshots of each tab go to
docs/screenshots/ for the README.
"""
import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app_server import ROOT, AppServer
from tiny_captioners import make_tiny_blip
from tiny_clip import save_tiny_clip
from trainer.data.demo import make_demo_dataset
from trainer.demo.classify import classify

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "docs" / "screenshots"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (see .ci/run)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ui") / "workspace"
    s = AppServer(ws, "--data-dir", str(tmp_path_factory.getbasetemp()))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(autouse=True)
def pages_closed(request):
    """Each browser test closes the pages it opened: a page left open keeps its timers polling the
    module's one server, which slows every later test on a 2-core machine (a CI run timed out so)."""
    yield
    if "browser" in request.fixturenames:
        for context in list(request.getfixturevalue("browser").contexts):
            context.close()


def wait_for(fn, timeout=120, every=0.5, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def pick(page, elem_id, option_text):
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=re.compile(re.escape(option_text))).first.click()


def set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def progress(page):
    el = page.locator("#run-progress")
    if not el.count():
        return "", 0
    return el.get_attribute("data-state") or "", int(el.get_attribute("data-step") or 0)


def test_full_workflow_in_a_browser(server, browser, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    data = make_demo_dataset(tmp_path / "my data", count=6, size=64)
    for name in ("004.txt", "005.txt"):  # two images have lost their captions
        (data / name).unlink()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server.url)

    # Dataset: type a folder path and load it.
    page.fill("#dataset-source textarea, #dataset-source input", str(data))
    page.click("#dataset-load")
    wait_for(lambda: "6 images" in page.inner_text("#dataset-counts"), 120, what="dataset counts")
    assert page.locator("#dataset-gallery img").count() >= 6
    problems = page.inner_text("#dataset-problems")
    assert "004.png" in problems and "005.png" in problems and "000.png" not in problems, problems
    page.screenshot(path=str(SHOTS / "dataset.png"), full_page=True)

    # Caption: fill the two missing captions automatically with the trigger word first, edit one by
    # hand, then add a tag at the end of all.
    page.get_by_role("tab", name="2 · Caption").click()
    box = page.locator("#caption-text textarea")
    wait_for(lambda: "lablora" in box.input_value(), 120, what="first caption")
    assert "downloaded" in page.inner_text("#caption-available")  # says at once whether a captioner is here
    blip = make_tiny_blip(tmp_path / "blip")
    page.get_by_label("Or a downloaded model folder").fill(str(blip))
    page.get_by_label("Trigger word (put first)").fill("lablora")
    page.click("#caption-auto")
    wait_for(lambda: "Done: 2 captions written" in page.inner_text("#caption-message"), 120,
             what=lambda: f"auto captions, not {page.inner_text('#caption-message')!r}")
    assert page.locator("#caption-auto-log textarea").input_value().count("lablora") == 2
    assert (data / "005.txt").read_text().startswith("lablora")
    page.click("#caption-auto")  # again: every image has a caption now, so no model is loaded for nothing
    wait_for(lambda: "nothing to fill in" in page.inner_text("#caption-message"), 120, what="nothing to caption")
    box.fill("lablora, a circle on a white background, hand edited")
    page.click("#caption-save")
    wait_for(lambda: (data / "000.txt").read_text() == "lablora, a circle on a white background, hand edited", 120,
             what="caption saved to its sidecar")
    page.get_by_label("Put last").fill("flat")
    page.click("#caption-apply")
    wait_for(lambda: "Changed 6 of 6" in page.inner_text("#caption-message"), 120, what="bulk edit")
    assert (data / "003.txt").read_text().endswith(", flat")
    page.screenshot(path=str(SHOTS / "caption.png"), full_page=True)

    # Train: the CPU demo preset (150 steps), samples and checkpoints every 25.
    page.get_by_role("tab", name="3 · Train").click()
    pick(page, "train-preset", "cpu-demo")
    wait_for(lambda: page.locator("#cfg-train-steps input[type=number]").input_value() == "150", 120, what="preset")
    set_number(page, "cfg-save-every-n-steps", 25)
    set_number(page, "cfg-sample-every-n-steps", 25)
    page.locator("#cfg-name textarea, #cfg-name input").first.fill("browser run")
    page.click("#train-start")
    wait_for(lambda: "Started" in page.inner_text("#train-message"), 120, what="start")
    wait_for(lambda: progress(page)[1] >= 10, 120,
             what=lambda: f"steps: {page.inner_text('#train-progress')!r} {page.inner_text('#train-message')!r}")
    wait_for(lambda: page.locator("#loss-plot path").count() > 0, 120, what="loss points")
    wait_for(lambda: page.locator("#train-samples img").count() >= 1, 120, what="a sample image")
    wait_for(lambda: "step 25 · " in page.inner_text("#train-samples"), 120, what="samples labelled with their step")
    page.click("#train-save-now")
    wait_for(lambda: "Save now: checkpoint saved at step" in page.locator("#train-log textarea").input_value(), 120,
             what="Save now in the log")

    page.click("#train-stop")
    state, stopped_at = wait_for(lambda: progress(page) if progress(page)[0] == "stopped" else None, 120,
                                 what="stopped state")
    assert stopped_at < 150
    run = server.workspace / "runs" / "browser-run"
    assert (run / "checkpoints" / f"step-{stopped_at:06d}").exists()

    # Resume from the history, then refresh the page mid-run: it re-attaches to the running job.
    page.click("#history-pick input")
    page.get_by_role("option", name="browser-run").click()
    page.click("#history-resume")
    wait_for(lambda: "Resumed" in page.inner_text("#train-message"), 120,
             what=lambda: f"resume (message {page.inner_text('#train-message')!r}, "
                          f"picked {page.locator('#history-pick input').input_value()!r})")
    wait_for(lambda: progress(page)[0] == "running" and progress(page)[1] > stopped_at, 120, what="running again")
    page.reload()
    page.get_by_role("tab", name="3 · Train").click()
    wait_for(lambda: progress(page)[0] in ("running", "completed") and progress(page)[1] > stopped_at, 120,
             what="re-attached progress")
    wait_for(lambda: page.locator("#loss-plot path").count() > 0, 120, what="full loss history after refresh")
    wait_for(lambda: page.locator("#cfg-train-steps input[type=number]").input_value() == "150", 120,
             what="the running run's settings in the form after refresh")
    source = page.locator("#dataset-source textarea, #dataset-source input")
    wait_for(lambda: source.input_value() == str(data), 120, what="and its dataset, so Start needs no reload of it")
    wait_for(lambda: progress(page)[0] == "completed", 600, what="completed run")
    page.click("#history-pick input")
    page.get_by_role("option", name="browser-run").click()
    page.click("#history-resume")  # a finished run: said beside the button, not above the live panel
    wait_for(lambda: "already completed" in page.inner_text("#history-message"), 120, what="resume refused")
    page.screenshot(path=str(SHOTS / "train.png"), full_page=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 151))
    # the validation loss before the start and at each checkpoint (every 25 steps); none extra for the resume
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 25, 50, 75, 100, 125, 150]
    wait_for(lambda: "val. on train" in (page.locator("#loss-plot").text_content() or ""), 120,
             what=lambda: f"the validation series in the loss plot's legend: {page.locator('#loss-plot').text_content()!r}")
    # and drawn, in the exported plot's orange: the points measured while the page watched too
    wait_for(lambda: page.locator("#loss-plot path[stroke='#e67814']").count() > 0, 120, what="the validation line")

    # Test: compare with the base model from the same seed, then export the zip.
    # Opening the tab offers the new LoRA first, named with its family and step; with the prompt box
    # left empty, Compare uses the run's own sample prompts.
    page.get_by_role("tab", name="4 · Test").click()
    lora_box = page.locator("#test-lora-0 input")
    wait_for(lambda: "browser-run.safetensors (SD 1.x, step 150)" in lora_box.input_value(), 120,
             what=lambda: f"the new LoRA in slot 1, not {lora_box.input_value()!r}")
    page.click("#test-compare")
    wait_for(lambda: "with LoRA · " in page.inner_text("#test-gallery"), 120, what="a comparison from the run's prompts")
    page.fill("#test-prompts textarea", "lablora, a cross on a black background")
    page.click("#test-compare")
    wait_for(lambda: "with LoRA · lablora, a cross on a black background" in page.inner_text("#test-gallery"), 120,
             what="comparison images")
    # One prompt: the two images keep a column each of four, so both captions are in view, not scrolled away.
    frame = page.locator("#test-gallery .grid-wrap").bounding_box()
    labels = [page.locator("#test-gallery .caption-label").nth(i).bounding_box() for i in range(2)]
    assert all(b["y"] + b["height"] <= frame["y"] + frame["height"] for b in labels), (frame, labels)
    wait_for(lambda: "6 images" in page.inner_text("#test-session"), 120, what="both comparisons kept for the export")
    # The set lives in the page: leaving it before the export makes the browser ask first, after it not (what
    # the page's beforeunload handler asks; a real beforeunload event would also end Gradio's connection).
    leaving = "() => window.loraLabUnsaved()"
    assert page.evaluate(leaving)
    page.click("#test-export")
    wait_for(lambda: "Exported" in page.inner_text("#test-message"), 120, what="export")
    wait_for(lambda: "All exported" in page.inner_text("#test-session"), 120, what="the set marked exported")
    assert not page.evaluate(leaving)
    page.screenshot(path=str(SHOTS / "test.png"), full_page=True)
    zips = list((server.workspace / "exports").glob("*.zip"))
    assert len(zips) == 1
    z = zipfile.ZipFile(zips[0])
    names = z.namelist()
    assert {"prompts.txt", "config.yaml", "loss.png", "lora/browser-run.safetensors", "settings.json",
            "comfyui_workflow_api.json", "comfyui_workflow.json"} <= set(names)
    images = sorted(n for n in names if n.startswith("images/"))  # every image of the session, not the last click's
    assert len(images) == 6 and images[-1] == "images/005_lablora-a-cross-on-a-black-background_with-LoRA.png", images
    # What the pictures show: the base model draws each shape in a colour of its own, the LoRA in the
    # demo dataset's pink (judged by the pixel classifier; README "The demo model").
    drawn = {n: classify(Image.open(z.open(n)), with_concept=True)["color"] for n in images}
    base_pink = [n for n, c in drawn.items() if n.endswith("_base.png") and c == "pink"]
    lora_pink = [n for n, c in drawn.items() if n.endswith("_with-LoRA.png") and c == "pink"]
    assert not base_pink and len(lora_pink) >= 2, drawn
    settings = json.loads(z.read("settings.json"))
    assert [e["file"] for e in settings["images"]] == [n.removeprefix("images/") for n in images]
    assert settings["images"][-1]["loras"] == [{"file": "browser-run.safetensors", "strength": 1.0}]

    # The strength sweep (LoRA 1 at 0 … 1) and the checkpoints × prompts grid of its run, scored by a CLIP
    # model (a tiny one built here: its numbers mean nothing, the path is what is tested).
    page.fill("#test-score-model textarea, #test-score-model input", str(save_tiny_clip(tmp_path / "clip")))
    page.get_by_role("button", name="Strength sweep (LoRA 1)").click()
    wait_for(lambda: page.locator("#test-gallery img").count() == 5 and "strength 0.75" in page.inner_text(
        "#test-gallery"), 120, what="a sweep of five strengths")
    wait_for(lambda: "strength" in page.inner_text("#test-message").lower(), 120, what="the sweep's recommendation")
    assert "likeness" in page.inner_text("#test-gallery") and "prompt" in page.inner_text("#test-gallery")
    page.get_by_role("button", name="Checkpoints × prompts (LoRA 1's run)").click()
    saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    wait_for(lambda: all(f"step {n} · likeness" in page.inner_text("#test-gallery") for n in saved), 120,
             what=f"one image per checkpoint {saved}")


def test_an_open_page_at_rest_draws_no_frames(server, browser):
    """A page left open costs its machine (often the training machine) nothing: Gradio's loading
    screen leaves a 60-frames-a-second loop behind, which ui/page_fix.py slows to 4 calls a second."""
    page = browser.new_page()
    page.add_init_script("""window.__frames = 0; const raf = window.requestAnimationFrame.bind(window);
        window.requestAnimationFrame = (cb) => { window.__frames++; return raf(cb); };""")
    page.goto(server.url)
    page.get_by_role("tab", name="3 · Train").click()
    page.locator("#run-progress").wait_for(timeout=120_000)  # the live stream has answered
    # A loaded machine (CI) may take a while to settle: measure 4-second spells until one is at rest.
    rates, deadline = [], time.time() + 120
    while time.time() < deadline and (not rates or rates[-1] >= 5):
        page.evaluate("window.__frames = 0")
        time.sleep(4)
        rates.append(page.evaluate("window.__frames") / 4)
    assert rates[-1] < 5, rates  # was 60 a second, for as long as the page was open
    page.close()
