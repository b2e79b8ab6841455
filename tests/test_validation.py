"""Validation loss, the best checkpoint and early stopping, on the trained demo model (tiny-demo) and the
demo dataset: the number changes only with the weights, falls while the concept is learned, rises with
a learning rate far too high, and early stopping ends the run completed with its best LoRA kept."""
import contextlib
import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_config
from trainer.config import resolve
from trainer.data.demo import make_demo_dataset
from trainer.loop import run_job
from trainer.prepare import prepare
from trainer.validation import HELD_OUT, OWN_FOLDER, TRAINING


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("twelve") / "data", count=12)


def demo_run(source, tmp_path, name, **extra):
    over = {"name": name, "dataset": {"source": str(source)}, "sample": {"every_n_steps": 0, "prompts": []}}
    for section, values in extra.items():
        over[section] = {**over.get(section, {}), **values}
    return run_job(resolve("cpu-demo", extra=over), tmp_path)


def test_the_same_weights_measure_the_same_and_other_weights_do_not(twelve, tmp_path):
    cfg = resolve("cpu-demo", extra={"dataset": {"source": str(twelve)}})
    p = prepare(cfg, tmp_path, torch.device("cpu"), torch.float32, lambda line: None)
    unet = p.model.unet
    unet.train()  # as the loop has it
    first = p.validator.measure(unet, "cpu", contextlib.nullcontext)
    second = p.validator.measure(unet, "cpu", contextlib.nullcontext)
    assert abs(first - second) <= 1e-6 * first
    assert unet.training  # put back in training mode
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    assert abs(p.validator.measure(unet, "cpu", contextlib.nullcontext) - first) > 1e-3 * first


def test_what_is_measured_on_held_out_share_own_folder_or_the_training_images(twelve, demo_dir, tmp_path):
    def validator(data, **v):
        cfg = tiny_config(data, **{f"validation.{k}": x for k, x in v.items()})
        p = prepare(cfg, tmp_path, torch.device("cpu"), torch.float32, lambda line: None)
        return p, p.validator

    p, v = validator(twelve)  # 12 images: 10 % held out, at least one, not trained on
    assert v.label == HELD_OUT and len(v.examples) == 1 and len(p.examples) == 11
    assert v.examples[0].index not in {e.index for e in p.examples}
    assert v.description == "1 held-out image × 4 timesteps"
    p, v = validator(twelve, share=0.25, timesteps=2)
    assert len(v.examples) == 3 and len(p.examples) == 9 and v.description.endswith("× 2 timesteps")
    p, v = validator(demo_dir)  # 6 images: all trained on, and the loss measured on them, labelled so
    assert v.label == TRAINING and len(v.examples) == len(p.examples) == 6
    p, v = validator(demo_dir, source=str(twelve))
    assert v.label == OWN_FOLDER and len(v.examples) == 12 and len(p.examples) == 6
    p, v = validator(twelve, enabled=False)
    assert v is None and len(p.examples) == 12


def test_validation_loss_falls_while_the_concept_is_learned(twelve, tmp_path):
    run = demo_run(twelve, tmp_path, "learns", save={"every_n_steps": 50})
    rows = run.validation()
    assert [r["step"] for r in rows] == [0, 50, 100, 150]
    assert all(r["val_on"] == HELD_OUT for r in rows)
    start, best = rows[0]["val_loss"], min(r["val_loss"] for r in rows)
    assert best < 0.6 * start, rows  # measured: 0.067 at the start, 0.021 by step 100
    st = run.status()
    assert st["state"] == "completed" and st["best_val_loss"] == best and "stopped_early" not in st
    # metrics.jsonl holds both kinds of row; the training rows are one per step, as before
    assert [r["step"] for r in run.metrics()] == list(range(1, 151))
    log = run.log_path.read_text()
    assert "validation loss: 1 held-out image × 4 timesteps, every 50 steps" in log
    best_file = run.path / "learns-best.safetensors"
    assert best_file.exists() == (st["best_step"] != 150)
    if best_file.exists():  # the LoRA of the best step, as the final file is of the last
        with safe_open(str(best_file), "pt") as f:
            assert f.metadata()["ss_steps"] == str(st["best_step"])
        assert st["best_lora"] == best_file.name


def test_a_far_too_high_learning_rate_raises_it_and_early_stopping_ends_the_run(twelve, tmp_path):
    run = demo_run(twelve, tmp_path, "high", train={"learning_rate": 0.05},
                   save={"every_n_steps": 25}, validation={"patience": 2})
    rows = run.validation()
    assert max(r["val_loss"] for r in rows[1:]) > 3 * rows[0]["val_loss"], rows  # measured: 0.067 → 1.05
    st = run.status()
    # Never better than the untrained model: stopped after two worse measurements, completed, no best file
    assert st["state"] == "completed" and st["stopped_early"] == st["step"] == 50 and st["best_step"] == 0
    assert st["best_lora"] is None and not (run.path / "high-best.safetensors").exists()
    assert run.lora_path("high").exists()
    assert "stopped early at step 50" in run.log_path.read_text()


def test_early_stopping_keeps_the_lora_of_the_best_step(twelve, tmp_path):
    run = demo_run(twelve, tmp_path, "noisy", train={"learning_rate": 0.008, "steps": 300},
                   save={"every_n_steps": 10}, validation={"patience": 3})
    st = run.status()
    rows = run.validation()
    assert st["state"] == "completed" and st["stopped_early"] == st["step"] < 300
    assert [r["step"] for r in rows][-4:] == [st["step"] - 30, st["step"] - 20, st["step"] - 10, st["step"]]
    best = min(rows, key=lambda r: r["val_loss"])
    assert 0 < st["best_step"] == best["step"] < st["step"]  # measured: best at step 60, stopped at 90
    best_file = run.path / st["best_lora"]
    with safe_open(str(best_file), "pt") as f, safe_open(str(run.lora_path("noisy")), "pt") as g:
        assert f.metadata()["ss_steps"] == str(best["step"]) and g.metadata()["ss_steps"] == str(st["step"])
        key = next(k for k in f.keys() if k.endswith("lora_up.weight"))
        assert not torch.equal(f.get_tensor(key), g.get_tensor(key))
    # the run folder says so to whoever reads it: status.json and the metrics rows
    assert json.loads(run.status_path.read_text())["best_step"] == best["step"]


def test_the_live_panel_history_and_loss_png_show_the_validation_loss(tmp_path):
    from PIL import Image

    from trainer.bundle import loss_plot_png
    from trainer.runs import new_run
    from ui.live_panel import live_update, progress_html, validation_label

    run = new_run(tmp_path, "shown")
    for step in range(1, 31):
        run.append_metrics({"step": step, "loss": 0.3 - step / 200, "lr": 1e-4, "time": float(step)})
        if step % 10 == 0:
            run.append_metrics({"step": step, "val_loss": {10: 0.2, 20: 0.1, 30: 0.15}[step], "val_on": HELD_OUT,
                                "time": float(step)})
    run.set_status("completed", step=30, total_steps=100, stopped_early=30, val_loss=0.15, best_step=20,
                   best_val_loss=0.1, best_lora="shown-best.safetensors")
    frame = live_update(run, {}, None)[1]
    series = dict(zip(frame["series"], frame["step"]))
    assert "validation" in series and list(frame["series"]).count("raw") == 30
    assert list(frame[frame["series"] == "validation"]["loss"]) == [0.2, 0.1, 0.15]
    html = progress_html(run.status(), {})
    assert "completed (stopped early at step 30)" in html and "validation 0.1500 (lowest 0.1000 at step 20)" in html
    on_training = [{"step": 5, "val_loss": 0.3, "val_on": TRAINING}]  # a small dataset: says what it measured
    assert validation_label(on_training) == "val. on train"

    def orange(path):
        return sum(1 for px in Image.open(path).convert("RGB").getdata() if px == (230, 120, 20))

    with_val = loss_plot_png(run.metrics(), tmp_path / "a.png", run.validation())
    without = loss_plot_png(run.metrics(), tmp_path / "b.png")
    assert orange(with_val) > 50 and orange(without) == 0
