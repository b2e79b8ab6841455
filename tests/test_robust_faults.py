"""Faults: a killed process, a crash or a full disk mid-save, NaN, out of memory, an app restart.

At most one save interval of work is lost, and never a finished file.
"""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_config
from trainer.checkpoint import latest_checkpoint
from trainer.errors import LoraLabError
from trainer.jobs import JobManager
from trainer.loop import Job, run_job
from trainer.runs import RunDir, new_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVER = {"train.steps": 24, "save.every_n_steps": 5}
KILL = {**OVER, "train.steps": 40}  # long enough that a fast machine is still training when it is killed


def losses(run):
    return [r["loss"] for r in run.metrics()]


def test_sigkill_mid_training_then_resume_continues_the_same_curve(demo_dir, tmp_path):
    cfg = tiny_config(demo_dir, name="killed", **KILL)
    cfg.write(tmp_path / "c.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(tmp_path / "c.yaml"),
                             "--workspace", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = RunDir(tmp_path / "runs" / "killed")
    deadline = time.time() + 300
    while time.time() < deadline and not (run.checkpoints_dir / "step-000010").exists():
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in run.metrics())
    kept = int(latest_checkpoint(run.checkpoints_dir).name.split("-")[1])
    assert run.status()["state"] == "running"  # it never got to say anything else
    # At most one save interval lost (all of it when the kill lands while the next checkpoint is written).
    assert killed_at - kept <= KILL["save.every_n_steps"]
    r = subprocess.run([sys.executable, "-m", "trainer", "resume", str(run.path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    assert [row["step"] for row in run.metrics()] == list(range(1, 41))
    whole = run_job(tiny_config(demo_dir, name="whole", **KILL), tmp_path)
    assert losses(run) == pytest.approx(losses(whole), abs=1e-5)
    assert run.lora_path("killed").exists()


@pytest.mark.parametrize("fault", ["crash", "disk full"])
def test_a_fault_during_a_checkpoint_write_keeps_the_previous_checkpoint(fault, demo_dir, tmp_path, monkeypatch):
    import trainer.checkpoint as ck

    real_save, calls = ck.torch.save, {"n": 0}

    def failing_save(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half a file, then fail
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            if fault == "disk full":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("simulated crash mid-write")
        return real_save(obj, path)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises((LoraLabError, RuntimeError)):
        run_job(tiny_config(demo_dir, name="fault", **OVER), tmp_path)
    run = RunDir(tmp_path / "runs" / "fault")
    st = run.status()
    assert st["state"] == "failed"
    if fault == "disk full":
        assert st["error"] == "The disk is full." and "resume" in st["advice"]
    assert latest_checkpoint(run.checkpoints_dir).name == "step-000005"
    assert not list(run.checkpoints_dir.glob("*.tmp"))
    monkeypatch.setattr(ck.torch, "save", real_save)
    run_job(tiny_config(demo_dir, name="fault", **OVER), tmp_path, run=run)
    assert run.status()["state"] == "completed" and [r["step"] for r in run.metrics()] == list(range(1, 25))


def test_out_of_memory_fails_with_advice_for_the_settings(demo_dir, tmp_path, monkeypatch):
    def oom(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Job, "micro_step", oom)
    with pytest.raises(LoraLabError, match="Out of accelerator memory"):
        run_job(tiny_config(demo_dir, name="oom", **{"train.batch_size": 2}), tmp_path)
    st = RunDir(tmp_path / "runs" / "oom").status()
    assert st["state"] == "failed" and "Out of accelerator memory" in st["error"]
    assert "train.batch_size (now 2)" in st["advice"] and "gradient_checkpointing" in st["advice"]
    assert "adamw8bit" in st["advice"]


def test_a_training_process_killed_by_the_system_fails_with_advice_and_the_manager_keeps_going(demo_dir, tmp_path):
    """What the Linux out-of-memory killer does: SIGKILL to the job's process, no word from it."""
    jobs = JobManager(tmp_path)
    run = jobs.start(tiny_config(demo_dir, name="killed", **{"train.steps": 400}))
    deadline = time.time() + 120
    while not run.status().get("speed") and time.time() < deadline:
        time.sleep(0.2)
    os.kill(jobs.slot_for(run).proc.pid, signal.SIGKILL)
    jobs.wait(60)
    st = run.status()
    assert st["state"] == "failed" and "killed" in st["error"] and "resume" in st["advice"]
    assert "killed" in run.log_path.read_text()
    after = jobs.start(tiny_config(demo_dir, name="after", **{"train.steps": 2}))
    jobs.wait(120)
    assert after.status()["state"] == "completed"


def test_the_app_going_away_stops_its_job_with_a_checkpoint_to_resume_from(demo_dir, tmp_path):
    """The job's stdin closes when the app dies (even by SIGKILL): it saves, ends as 'stopped'."""
    jobs = JobManager(tmp_path)
    run = jobs.start(tiny_config(demo_dir, name="orphaned", **{"train.steps": 400}))
    deadline = time.time() + 120
    while (run.status().get("step") or 0) < 3 and time.time() < deadline:
        time.sleep(0.2)
    jobs.slot_for(run).proc.stdin.close()  # what the OS does for a dead app
    jobs.wait(60)
    st = run.status()
    assert st["state"] == "stopped" and 3 <= st["step"] < 400
    assert latest_checkpoint(run.checkpoints_dir) is not None


def test_resume_right_after_the_page_shows_stopped_is_taken(demo_dir, tmp_path):
    """A run shows 'stopped' as soon as its job says so, a moment before its process has ended: a
    Resume clicked then must resume it, not say it is still running."""
    jobs = JobManager(tmp_path)
    run = jobs.start(tiny_config(demo_dir, name="quick", **{"train.steps": 400}))
    deadline = time.time() + 120
    while (run.status().get("step") or 0) < 2 and time.time() < deadline:
        time.sleep(0.1)
    jobs.stop(run)
    while run.status().get("state") != "stopped" and time.time() < deadline:
        time.sleep(0.01)
    assert run.status().get("speed")  # what the stopped session last measured
    jobs.resume(run.path)  # raised "already running or waiting" before
    st = run.status()  # until the resumed job measures its own, no speed or ETA (the old ones were shown)
    assert st["state"] in ("queued", "running") and st.get("speed") is None and st.get("eta") is None
    while (run.status().get("step") or 0) < 4 and time.time() < deadline:
        time.sleep(0.2)
    assert run.status()["state"] == "running"
    jobs.stop(run)
    jobs.wait(60)


def test_runs_left_running_by_a_dead_process_show_as_interrupted_with_resume(tmp_path):
    run = new_run(tmp_path, "orphan")
    (run.path / "config.yaml").write_text("name: orphan\n")
    run.set_status("running", step=7, total_steps=20, pid=2**22 + 12345)  # no such process
    JobManager(tmp_path)  # what the app does at start
    st = json.loads(run.status_path.read_text())
    assert st["state"] == "interrupted" and "Resume" in st["advice"] and st["step"] == 7


def test_training_goes_on_with_nobody_watching(demo_dir, tmp_path):
    jobs = JobManager(tmp_path)
    run = jobs.start(tiny_config(demo_dir, name="alone", **{"train.steps": 6}))
    jobs.wait(120)
    assert run.status()["state"] == "completed" and run.lora_path("alone").exists()


def test_a_stop_given_while_the_job_is_still_starting_is_not_lost(demo_dir, tmp_path):
    jobs = JobManager(tmp_path)
    run = jobs.start(tiny_config(demo_dir, name="early", **{"train.steps": 400}))
    jobs.stop(run)  # its process is still importing torch
    jobs.wait(120)
    st = run.status()
    assert st["state"] == "stopped" and st["step"] < 400


def test_sampling_shows_which_image_it_makes_and_a_stop_ends_it_between_denoising_steps(demo_dir, tmp_path):
    """Sampling during training can take long (a CPU, 512 px): the live panel says so, and Stop does not
    wait for the remaining images."""
    jobs = JobManager(tmp_path)
    run = jobs.start(tiny_config(demo_dir, name="sampling", **{
        "train.steps": 400, "sample.every_n_steps": 3, "sample.steps": 200,
        "sample.prompts": ["lablora, a circle", "a square", "a cross", "a triangle"]}))
    deadline = time.time() + 180
    while "making samples" not in (run.status().get("phase") or "") and time.time() < deadline:
        time.sleep(0.05)
    assert re.match(r"making samples: image [1-4] of 4 \(200 steps each\)", run.status()["phase"])
    jobs.stop(run)
    jobs.wait(120)
    st = run.status()
    assert st["state"] == "stopped" and st["step"] < 400
    assert len(list(run.samples_dir.glob(f"step{st['step']:06d}_*.png"))) < 4  # it did not finish the set
    assert "left unfinished: stopping" in run.log_path.read_text()
