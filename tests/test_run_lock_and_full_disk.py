"""One process per run folder, whatever path or app reached it; and a full disk ends a run as 'failed', not a crash.

The full disk is real: a small tmpfs mounted in the test's folder (needs root, as in CI), filled with a file.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import tiny_config
from trainer.bundle import export_bundle
from trainer.checkpoint import latest_checkpoint, load_checkpoint
from trainer.errors import LoraLabError
from trainer.jobs import JobManager
from trainer.loop import run_job
from trainer.runs import RunDir, new_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(condition, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) → a folder that is a file system of its own, `size` big (tmpfs)."""
    mounted = []

    def mount(size: str):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill ({(r.stderr or r.stdout).strip()}); needs root")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # a process still had a file open


def fill(disk, leave: int = 0):
    """Fill `disk` with one file until `leave` bytes are free (0: completely); delete the file to free the space."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:
        try:
            f.write(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))
            while not leave:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def leftovers(run):
    """Temporary files (status, metrics, checkpoint, LoRA, sample) left in the run folder."""
    return [p.name for p in run.path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def steps(run):
    return [r["step"] for r in run.metrics()]


# --- a full disk ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill_at,leave,kept", [
    (5, 100_000, "step-000005"),  # the next checkpoint's adapter fits, its optimizer state (torch.save) does not
    (5, 0, "step-000005"),        # not a byte: status.json is rewritten in place, safetensors fails
    (12, 20_000, "step-000012"),  # the last checkpoint fits, the final LoRA file does not
], ids=["checkpoint-little-space", "checkpoint-disk-completely-full", "final-lora-file"])
def test_a_full_disk_fails_the_run_with_advice_and_resume_finishes_it(fill_at, leave, kept, demo_dir, small_disk):
    disk = small_disk("1m")
    filler = []

    def on_event(e):  # the disk fills up while the run trains (another program's download, say)
        if e.kind == "checkpoint" and e.data["step"] == fill_at:
            filler.append(fill(disk, leave))

    cfg = tiny_config(demo_dir, name="full", **{"train.steps": 12, "save.every_n_steps": 5})
    with pytest.raises(LoraLabError, match="The disk is full"):
        run_job(cfg, disk, callback=on_event)
    run = RunDir(disk / "runs" / "full")
    st = run.status()
    assert st["state"] == "failed" and st["error"] == "The disk is full."
    assert "resume" in st["advice"] and "bug" not in st["advice"]
    assert leftovers(run) == []
    assert latest_checkpoint(run.checkpoints_dir).name == kept
    load_checkpoint(latest_checkpoint(run.checkpoints_dir))  # complete, not half written
    assert not (run.path / "run.lock").exists()

    filler[0].unlink()
    run_job(tiny_config(demo_dir, name="full", **{"train.steps": 12, "save.every_n_steps": 5}), disk, run=run)
    assert run.status()["state"] == "completed" and run.lora_path("full").exists()
    assert steps(run) == list(range(1, 13))


def test_status_is_still_written_on_a_completely_full_disk(small_disk):
    disk = small_disk("64k")
    run = new_run(disk, "r")
    run.set_status("running", step=3)
    fill(disk)
    run.set_status("failed", error="The disk is full.", advice="Free some space, then resume.")
    assert json.loads(run.status_path.read_text())["state"] == "failed"
    assert leftovers(run) == []
    run.log("a line that does not fit")  # lost, quietly


def test_an_export_on_a_full_disk_says_so_and_leaves_no_partial_zip(small_disk):
    disk = small_disk("64k")
    fill(disk, 2000)
    noise = Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3))  # does not compress
    with pytest.raises(LoraLabError, match="The disk is full"):
        export_bundle(disk / "exports" / "x.zip", [("a.png", noise)], ["a prompt"], None, None, {})
    assert [p.name for p in (disk / "exports").iterdir()] == []


def test_a_full_disk_fails_the_apps_run_and_the_next_queued_run_still_trains(demo_dir, small_disk, tmp_path):
    """The app's job thread survives: the run shows 'failed' (never 'running' with no process), the device is freed."""
    disk = small_disk("2m")
    jobs = JobManager(disk, devices=["auto"])
    run = jobs.start(tiny_config(demo_dir, name="full", **{"train.steps": 80, "save.every_n_steps": 40}))
    wait_for(lambda: (run.status().get("step") or 0) >= 2, "the run to train")
    filler = fill(disk)
    after = jobs.start(tiny_config(demo_dir, name="after", **{"train.steps": 3}), workspace=tmp_path / "other")
    assert jobs.position(after) == 1
    jobs.wait(300)
    st = run.status()
    assert st["state"] == "failed" and st["error"] == "The disk is full." and "resume" in st["advice"]
    assert after.status()["state"] == "completed"
    assert leftovers(run) == []

    filler.unlink()
    jobs.resume(run.path)
    jobs.wait(300)
    assert run.status()["state"] == "completed", (run.status(), (run.path / "process.log").read_text()[-2000:])
    assert steps(run) == list(range(1, 81))


# --- one process per run --------------------------------------------------------------------------------------
def test_a_run_being_trained_is_refused_to_a_second_process_and_app_and_left_untouched(demo_dir, tmp_path):
    jobs = JobManager(tmp_path)
    run = jobs.start(tiny_config(demo_dir, name="dup", **{"train.steps": 5000}))
    wait_for(lambda: (run.status().get("step") or 0) >= 2, "the run to train")
    trainer_pid = jobs.slot_for(run).proc.pid
    other_spelling = tmp_path / "runs" / ".." / "runs" / "dup"

    r = subprocess.run([sys.executable, "-m", "trainer", "resume", str(other_spelling)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert f"already being trained by process {trainer_pid} (on {socket.gethostname()})" in r.stderr
    assert "Traceback" not in r.stderr

    second_app = JobManager(tmp_path)  # a second app on the same workspace: it must not call the run interrupted
    assert run.status()["state"] == "running"
    with pytest.raises(LoraLabError, match=f"already being trained by process {trainer_pid}"):
        second_app.resume(other_spelling)
    with pytest.raises(LoraLabError, match="already running or waiting"):
        jobs.resume(other_spelling)  # the same run, spelled otherwise, in the app that trains it

    st = run.status()
    assert st["state"] == "running" and st["pid"] == trainer_pid and not st.get("error")
    wait_for(lambda: (run.status().get("step") or 0) > st["step"], "the run to go on")
    done = steps(run)
    assert done == list(range(1, len(done) + 1))  # one writer: no step twice

    jobs.stop(run)
    jobs.wait(120)
    stopped = run.status()
    assert stopped["state"] == "stopped"
    second_app.resume(other_spelling)  # now it may
    wait_for(lambda: (run.status().get("step") or 0) > stopped["step"] + 2, "the resumed run to train")
    assert run.status()["state"] == "running"
    second_app.stop(run)
    second_app.wait(120)
    done = steps(run)
    assert done == list(range(1, len(done) + 1))


def test_an_app_starting_leaves_a_run_that_a_live_process_holds_running(tmp_path):
    """Its status may not name the trainer yet (a command line run between making its folder and loading)."""
    from trainer import run_lock

    run = new_run(tmp_path, "held")
    (run.path / "config.yaml").write_text("name: held\n")
    run.set_status("running", step=0)
    lock = run_lock.acquire(run.path)  # this test's process trains it
    try:
        JobManager(tmp_path)
        assert run.status()["state"] == "running"
    finally:
        lock.release()
    JobManager(tmp_path)
    assert run.status()["state"] == "interrupted"


def _stopped_run(demo_dir, tmp_path, name):
    cfg = tiny_config(demo_dir, name=name, **{"train.steps": 3})
    run = new_run(tmp_path, name)
    cfg.write(run.config_path)
    run.set_status("stopped", step=0, total_steps=3)
    return cfg, run


def test_a_lock_left_by_a_process_that_is_gone_does_not_block_resume(demo_dir, tmp_path):
    cfg, run = _stopped_run(demo_dir, tmp_path, "stale")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run.path / "run.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": 1.0}))
    jobs = JobManager(tmp_path)
    jobs.resume(run.path)
    jobs.wait(300)
    assert run.status()["state"] == "completed"
    assert not (run.path / "run.lock").exists()


def test_a_lock_naming_a_reused_pid_does_not_block_resume(demo_dir, tmp_path):
    """The pid is alive, but it is another process now (its start time differs from the lock's)."""
    cfg, run = _stopped_run(demo_dir, tmp_path, "reused")
    (run.path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "started": 1.0}))
    run_job(cfg, tmp_path, run=run)
    assert run.status()["state"] == "completed"
    assert not (run.path / "run.lock").exists()


RACE = """
import sys, time
from trainer import run_lock
from trainer.errors import LoraLabError
start = float(sys.argv[2])
time.sleep(max(0, start - time.time()))
try:
    lock = run_lock.acquire(sys.argv[1])
except LoraLabError:
    print("refused")
else:
    print("won", flush=True)
    sys.stdin.read()  # held until all have tried
    lock.release()
"""


def test_of_processes_racing_for_a_stale_lock_exactly_one_takes_it(tmp_path):
    run = new_run(tmp_path, "race")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run.path / "run.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": 1.0}))
    start = time.time() + 3  # all of them imported and waiting by then
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(run.path), str(start)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(6)]
    said = sorted(p.stdout.readline().strip() for p in procs)
    for p in procs:
        p.communicate(timeout=60)
    assert said == ["refused"] * 5 + ["won"]
    assert not list(run.path.glob("*lock*")) and not list(run.path.glob(".*"))
