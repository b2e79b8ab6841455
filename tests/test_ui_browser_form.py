"""The Train tab's form in a real browser: a wrong number is named in place, Check settings warns before
a run is spoilt, a preset of one's own is saved, and a past run's settings come back with one click."""
import pytest

from app_server import AppServer
from conftest import tiny_config
from test_ui_browser import (CHROMIUM, SHOTS, browser, pages_closed, pick, progress,  # noqa: F401 (fixtures)
                             set_number, wait_for)
from trainer.data.demo import make_demo_dataset
from trainer.loop import run_job

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path(CHROMIUM).exists(), reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = AppServer(tmp_path_factory.mktemp("form") / "workspace")
    yield s
    s.stop()


def train_tab_with(browser, server, data):
    """A new page with `data` (4 images) loaded and the Train tab open on the cpu-demo preset."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server.url)
    page.fill("#dataset-source textarea, #dataset-source input", str(data))
    page.click("#dataset-load")
    wait_for(lambda: "4 images" in page.inner_text("#dataset-counts"), 120, what="dataset counts")
    page.get_by_role("tab", name="3 · Train").click()
    pick(page, "train-preset", "cpu-demo")
    wait_for(lambda: "cpu-demo" in page.inner_text("#train-preset-info"), 120, what="preset")
    return page


def test_form_problems_show_in_place_and_settings_can_be_kept_and_reused(server, browser, tmp_path):
    data = make_demo_dataset(tmp_path / "pink", count=4)
    run_job(tiny_config(data, name="last week", **{"train.steps": 3, "network.rank": 8}), server.workspace)
    page = train_tab_with(browser, server, data)

    # A number out of range: the message names the field and its range; the run table stays as it was.
    set_number(page, "cfg-train-steps", 0)
    page.click("#train-start")
    wait_for(lambda: "Steps (train.steps): 0 is out of range" in page.inner_text("#train-message"), 120,
             what=lambda: f"the field named, not {page.inner_text('#train-message')!r}")
    assert "1 to 10000000" in page.inner_text("#train-message")
    assert "Error" not in page.inner_text("#run-history") and "last-week" in page.inner_text("#run-history"), (
        page.inner_text("#run-history"), page.inner_text("#train-message"))
    assert not (server.workspace / "runs" / "lora").exists()

    # Check settings: sample prompts without the dataset's trigger word, intervals longer than the run.
    set_number(page, "cfg-train-steps", 60)
    set_number(page, "cfg-save-every-n-steps", 500)
    set_number(page, "cfg-sample-every-n-steps", 100)
    page.fill("#cfg-sample-prompts textarea", "sks, a circle on a white background")
    page.get_by_role("button", name="Check settings").click()
    wait_for(lambda: "lack the trigger word 'lablora'" in page.inner_text("#train-summary"), 120,
             what="trigger word warning")
    summary = page.inner_text("#train-summary")
    assert "Checkpoints every 500 steps, but the run has 60" in summary
    assert "Samples every 100 steps, but the run has 60" in summary
    page.screenshot(path=str(SHOTS / "train-check-settings.png"), full_page=True)
    set_number(page, "cfg-train-steps", 61)  # the summary says it describes the settings as they were
    wait_for(lambda: "Settings changed since this check" in page.inner_text("#train-summary"), 120,
             what="the summary marked out of date")

    # A preset of one's own: saved into the workspace, then offered under Preset.
    page.get_by_text("Save these settings as a preset of your own").click()
    page.fill("#preset-name textarea, #preset-name input", "my quick")
    page.click("#preset-save")
    wait_for(lambda: "Saved preset my quick" in page.inner_text("#train-preset-info"), 120, what="preset saved")
    assert (server.workspace / "presets" / "my quick.yaml").exists()
    page.click("#train-preset input")
    assert page.get_by_role("option", name="my quick").count() == 1
    page.keyboard.press("Escape")

    # Use these settings: a past run's settings come back into the form.
    page.click("#history-pick input")
    page.get_by_role("option", name="last-week").click()
    page.click("#history-reuse")
    wait_for(lambda: page.locator("#cfg-train-steps input[type=number]").input_value() == "3", 120,
             what="the past run's steps in the form")
    assert page.locator("#cfg-network-rank input[type=number]").input_value() == "8"
    assert "settings of last-week" in page.inner_text("#history-message")


def test_the_live_panel_follows_the_run_started_on_its_page_and_stays_put_for_others(server, browser, tmp_path):
    """A run started on the page while another is going is shown once that one ends; a run started elsewhere
    (another tab, a script) does not pull the panel away: the panel says so and follows only when asked. A run
    opened in the history shows its new state when it ends."""
    from gradio_client import Client

    data = make_demo_dataset(tmp_path / "views", count=4)
    page = train_tab_with(browser, server, data)
    set_number(page, "cfg-train-steps", 5000)
    page.fill("#cfg-sample-prompts textarea", "")

    def shown():
        el = page.locator("#run-progress .run-name")
        return el.inner_text() if el.count() else ""

    page.fill("#cfg-name textarea, #cfg-name input", "first")
    page.click("#train-start")
    wait_for(lambda: shown() == "first" and progress(page)[0] == "running", 120, what="the first run running")
    page.fill("#cfg-name textarea, #cfg-name input", "second")
    page.click("#train-start")
    wait_for(lambda: "Queued second" in page.inner_text("#train-message"), 120, what="the second run queued")
    assert shown() == "first"  # while the first goes on, the panel stays on it
    page.click("#history-pick input")
    page.get_by_role("option", name="first").click()
    wait_for(lambda: "running" in page.inner_text("#history-message"), 120, what="the opened run running")

    page.click("#train-stop")  # the first run stops; the one queued from this page starts, and the panel shows it
    wait_for(lambda: shown() == "second" and progress(page)[0] == "running", 120,
             what=lambda: f"the panel on the second run, not {shown()!r} {progress(page)}")
    wait_for(lambda: "stopped" in page.inner_text("#history-message"), 120,
             what=lambda: f"the opened run's new state, not {page.inner_text('#history-message')!r}")
    page.click("#train-stop")
    wait_for(lambda: progress(page)[0] == "stopped", 120, what="the second run stopped")

    # A run started by a script: the panel stays on the run it shows and says that another is going.
    Client(server.url, verbose=False).predict(
        f"name: third\nmodel: {{base: tiny-demo}}\ndataset: {{source: '{data}', resolution: 64}}\n"
        "train: {steps: 5000, device: cpu}\n", api_name="/start_run")
    wait_for(lambda: page.locator("#run-other").count() and "third" in page.inner_text("#run-other"), 120,
             what="the panel saying that another run is going")
    assert shown() == "second"
    page.screenshot(path=str(SHOTS / "train-another-run.png"), full_page=True)
    page.click("#live-follow")
    wait_for(lambda: shown() == "third" and progress(page)[0] == "running", 120, what="the panel following")
    assert not page.locator("#run-other").count()
    page.click("#train-stop")
    wait_for(lambda: progress(page)[0] == "stopped", 120, what="the third run stopped")


def test_a_small_card_preset_fills_the_memory_options_and_the_estimate_shows_each_phase(server, browser, tmp_path):
    data = make_demo_dataset(tmp_path / "small", count=4)
    page = train_tab_with(browser, server, data)
    pick(page, "train-preset", "sdxl-6gb")
    wait_for(lambda: "sdxl-6gb" in page.inner_text("#train-preset-info"), 120, what="preset")
    page.get_by_text("More model options").click()
    page.get_by_text("More train options").click()
    wait_for(lambda: page.input_value("#cfg-model-weight-dtype input") == "fp8_e4m3fn", 120, what="fp8 base weights")
    assert page.input_value("#cfg-train-offload input") == "text_encoders"
    page.get_by_role("button", name="Check settings").click()
    wait_for(lambda: "GB by phase: caching" in page.inner_text("#train-summary"), 120, what="the estimate per phase")
    summary = page.inner_text("#train-summary")
    assert "loading" in summary and "training" in summary
    page.locator("#cfg-train-offload").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "train-small-card.png"), full_page=True)
