"""The headless CLI as a user runs it: real processes, real files, readable errors."""
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=600)


def test_demo_train_and_sample_from_the_command_line(tmp_path):
    assert cli("demo-dataset", tmp_path / "data", "--count", "4").returncode == 0
    r = cli("tiny-model", tmp_path / "model")
    assert r.returncode == 0 and (tmp_path / "model" / "model_index.json").exists()
    r = cli("train", "--preset", "cpu-demo", "--workspace", tmp_path / "ws",
            "--set", f"dataset.source={tmp_path / 'data'}", "--set", f"model.base={tmp_path / 'model'}",
            "--set", "train.steps=6", "--set", "sample.every_n_steps=0", "--set", "name=cli run")
    assert r.returncode == 0, r.stderr[-2000:]
    lora = tmp_path / "ws" / "runs" / "cli-run" / "cli-run.safetensors"
    assert f"done: {lora}" in r.stdout and lora.exists()
    assert "6/6" in r.stderr  # the terminal progress bar reached the end
    # what a user reads: LoRA Lab's lines, not the libraries' loading bars and notes
    assert "Loading pipeline components" not in r.stderr and "requires torchvision" not in r.stderr
    out = tmp_path / "samples"
    r = cli("sample", "--base", tmp_path / "model", "--lora", f"{lora}:1.0", "--prompt", "lablora, a red circle",
            "--seed", "3", "--steps", "3", "--out", out / "with")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("sample", "--base", tmp_path / "model", "--prompt", "lablora, a red circle", "--seed", "3", "--steps", "3",
            "--out", out / "without")
    a = np.asarray(Image.open(next((out / "with").glob("*.png"))), dtype=float)
    b = np.asarray(Image.open(next((out / "without").glob("*.png"))), dtype=float)
    assert a.shape == b.shape and np.abs(a - b).mean() > 0.5


def test_user_errors_are_one_line_without_a_traceback(tmp_path):
    r = cli("train", "--preset", "cpu-demo", "--set", "train.learnin_rate=1")
    assert r.returncode == 2
    assert "error: Unknown config key 'train.learnin_rate'. Did you mean 'learning_rate'?" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("train", "--preset", "cpu-demo", "--workspace", tmp_path, "--set", f"dataset.source={tmp_path / 'none'}")
    assert r.returncode == 2 and "Dataset" in r.stderr and "was not found" in r.stderr and "Traceback" not in r.stderr
    r = cli("resume", tmp_path)
    assert r.returncode == 2 and "not a run folder" in r.stderr


def test_train_and_presets_find_the_workspaces_own_presets(tmp_path):
    from trainer.config import resolve, save_preset

    save_preset(resolve("cpu-demo", sets=["train.steps=2"]), tmp_path / "ws" / "presets", "quick")
    listed = cli("presets", "--workspace", tmp_path / "ws")
    assert listed.returncode == 0 and "quick" in listed.stdout and "cpu-demo" in listed.stdout
    data = tmp_path / "data"
    cli("demo-dataset", data, "--count", "2")
    r = cli("train", "--preset", "quick", "--workspace", tmp_path / "ws", "--set", f"dataset.source={data}")
    assert r.returncode == 0, r.stderr
    assert '"step": 2' in (tmp_path / "ws" / "runs" / "lora" / "metrics.jsonl").read_text().splitlines()[-1]
