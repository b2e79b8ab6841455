"""The live panel streams a watching page only what changed, and redraws curves at most every few seconds."""
import asyncio
import time

import gradio as gr

from trainer.runs import new_run
from ui.live_panel import HISTORY_EVERY, history_update, is_skip, live_update, streamed


def test_a_page_that_has_everything_gets_nothing_and_new_steps_show(tmp_path):
    run = new_run(tmp_path, "live")
    run.set_status("running", step=1, total_steps=10)
    run.append_metrics({"step": 1, "loss": 0.5, "lr": 1e-4, "time": 0.0})
    run.log("started")
    first = live_update(run, {}, None)
    assert "step 1 / 10" in first[0] and first[1] is not None and "started" in first[3]
    again = live_update(run, {}, first[5])
    assert all(is_skip(x) for x in again[:5])  # nothing new: nothing sent
    run.set_status("running", step=2, total_steps=10)
    run.append_metrics({"step": 2, "loss": 0.4, "lr": 1e-4, "time": 1.0})
    step2 = live_update(run, {}, again[5])
    assert "step 2 / 10" in step2[0]
    assert is_skip(step2[1]) and is_skip(step2[3]) and is_skip(step2[4])  # curve waits; log and samples unchanged
    run.set_status("completed", step=2, total_steps=10)
    done = live_update(run, {}, step2[5])
    assert list(done[1]["step"]) == [1, 2, 1, 2]  # a finished run gets its full curve at once (raw + smoothed)


def test_no_run_yet_shows_the_empty_state_once(tmp_path):
    first = live_update(None, {}, None)
    assert "No run yet" in first[0]
    assert all(is_skip(x) for x in live_update(None, {}, first[5])[:5])


def test_history_sends_state_changes_at_once_and_running_steps_now_and_then(monkeypatch):
    rows = [["a", "running", "1/10", "0.5", "t"]]
    table, choices, last = history_update(rows, None)
    assert table == rows and choices["choices"] == ["a"]  # the first look fills table and dropdown
    later = [["a", "running", "2/10", "0.4", "t"]]
    assert all(is_skip(x) for x in history_update(later, last)[:2])  # steps alone wait a while
    monkeypatch.setattr(time, "time", lambda: last["at"] + HISTORY_EVERY + 1)
    table, choices, _ = history_update(later, last)
    assert table == later and is_skip(choices)  # then show; the open dropdown is left alone
    done = [["a", "completed", "10/10", "0.3", "t"], ["b", "queued", "0/5", "—", "t"]]
    table, choices, _ = history_update(done, last)
    assert table == done and choices["choices"] == ["a", "b"]  # a state change or a new run: at once


def test_the_stream_pushes_changes_survives_a_bad_look_and_sends_a_heartbeat():
    looks = iter([[1, gr.skip()], [gr.skip(), gr.skip()], OSError("gone"), [gr.skip(), 2], [gr.skip(), gr.skip()]])

    def look(last, session=None):
        x = next(looks, [gr.skip(), gr.skip()])
        if isinstance(x, Exception):
            raise x
        return x, last

    async def first(n):
        got, stream = [], streamed(look, every=0.01, heartbeat=0.05)()
        async for out in stream:
            got.append(out)
            if len(got) == n:
                return got

    got = asyncio.run(first(3))
    assert got[0][0] == 1 and got[1][1] == 2  # changes only; the failed look was skipped
    assert all(is_skip(x) for x in got[2])  # nothing new for a while: an empty heartbeat


def test_progress_shows_gpu_memory_and_the_training_peak():
    from ui.live_panel import progress_html

    st = {"state": "running", "step": 40, "total_steps": 100}
    html = progress_html(st, {"speed": 2.0, "eta": 30, "memory": 2.5 * 1024**3, "peak_memory": 3.25 * 1024**3})
    assert "2.00 steps/s" in html and "GPU memory 2.5 GB (peak 3.2 GB)" in html
    assert "GPU memory" not in progress_html(st, {"speed": 2.0, "eta": 30})  # a CPU run has none


def test_the_test_tab_counts_images_across_the_calls_of_one_click():
    """A comparison makes the LoRA images, then the base ones: the progress bar counts on, "k of N"."""
    from ui.test_tab import ImageCounter

    seen = []
    counter = ImageCounter(lambda fraction, desc: seen.append((round(fraction, 2), desc)), 4)
    for _ in range(2):  # two generate() calls of two prompts each
        report = counter.next_batch()
        for i in range(2):
            report(i, 2)
    assert seen == [(0.0, "making image 1 of 4"), (0.25, "making image 2 of 4"), (0.5, "making image 3 of 4"),
                    (0.75, "making image 4 of 4")]
