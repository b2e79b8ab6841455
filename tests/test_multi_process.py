"""Data-parallel training under `accelerate launch`, tested with two CPU processes (gloo)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from trainer.runs import RunDir

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"


def launch(args, n=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(run):
    return [r["loss"] for r in run.metrics()]


@pytest.fixture(scope="module")
def two_process_run(demo_dir, tmp_path_factory):
    ws = tmp_path_factory.mktemp("dp")
    cfg = tiny_config(demo_dir, name="two", **{"train.steps": 8, "train.batch_size": 1, "train.learning_rate": 1e-2,
                                               "save.every_n_steps": 4, "dataset.bucketing": False})
    cfg.write(ws / "two.yaml")
    r = launch(["train", "--config", str(ws / "two.yaml"), "--workspace", str(ws)])
    assert r.returncode == 0, r.stderr[-3000:]
    return ws, r


def test_two_processes_make_one_run_that_loads(two_process_run):
    from trainer.lora_file import AppliedLoras
    from trainer.models.load import load_base

    ws, r = two_process_run
    assert [p.name for p in (ws / "runs").iterdir()] == ["two"]
    assert r.stdout.count("done:") == 1  # only the main process reports
    run = RunDir(ws / "runs" / "two")
    assert run.status()["state"] == "completed" and [x["step"] for x in run.metrics()] == list(range(1, 9))
    AppliedLoras(load_base("tiny-random"), [(run.lora_path("two"), 1.0)])


def test_two_processes_of_batch_b_follow_one_process_of_batch_2b(two_process_run, demo_dir):
    from trainer.loop import run_job

    ws, _ = two_process_run
    one = run_job(tiny_config(demo_dir, name="one", **{"train.steps": 8, "train.batch_size": 2,
                                                        "train.learning_rate": 1e-2, "dataset.bucketing": False}), ws)
    assert losses(RunDir(ws / "runs" / "two")) == pytest.approx(losses(one), abs=1e-4)


def test_resume_with_a_different_number_of_processes(two_process_run, tmp_path):
    ws, _ = two_process_run
    run_dir = tmp_path / "runs" / "two"
    shutil.copytree(ws / "runs" / "two", run_dir)
    run = RunDir(run_dir)
    shutil.rmtree(run.checkpoints_dir / "step-000008")
    run.lora_path("two").unlink()
    run.set_status("interrupted", step=8)
    r = subprocess.run([sys.executable, "-m", "trainer", "resume", str(run_dir)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    st = json.loads(run.status_path.read_text())
    assert st["state"] == "completed" and [x["step"] for x in run.metrics()] == list(range(1, 9))
    assert "resumed from step-000004" in run.log_path.read_text()
