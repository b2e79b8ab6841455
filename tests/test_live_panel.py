"""The live panel sends a watching page only what changed, and redraws curves at most every few seconds."""
from trainer.runs import new_run
from ui.live_panel import live_update


def is_skip(x) -> bool:
    return isinstance(x, dict) and x.get("__type__") == "update" and len(x) == 1


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
