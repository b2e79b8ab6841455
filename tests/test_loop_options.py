"""Every optimizer, schedule, loss and precision option runs and does what it says."""
import math

import pytest
import torch

from conftest import tiny_config
from trainer.errors import LoraLabError
from trainer.loop import run_job
from trainer.optim import make_optimizer, make_scheduler, min_snr_weights


def losses(run):
    return [r["loss"] for r in run.metrics()]


@pytest.mark.parametrize("optimizer, lr", [("adamw", 1e-3), ("adamw8bit", 1e-3), ("adam", 1e-3), ("sgd", 1e-2),
                                           ("rmsprop", 1e-4), ("adafactor", 1e-3), ("prodigy", 1.0)])
def test_every_optimizer_trains(optimizer, lr, demo_dir, tmp_path):
    run = run_job(tiny_config(demo_dir, name=optimizer, **{"train.optimizer": optimizer, "train.learning_rate": lr,
                                                            "train.steps": 3}), tmp_path)
    assert run.status()["state"] == "completed"
    assert all(math.isfinite(x) for x in losses(run))


def test_adamw8bit_keeps_8bit_state_even_for_small_lora_tensors():
    p = torch.nn.Parameter(torch.randn(4, 32))  # 128 elements: far under bitsandbytes' 4096 default
    opt = make_optimizer("adamw8bit", [{"params": [p]}], 1e-3, 0.0, torch.device("cpu"))
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("name, expect", [("constant", [1.0, 1.0, 1.0]), ("constant_with_warmup", [0.5, 1.0, 1.0]),
                                          ("linear", [0.5, 1.0, 0.5]), ("cosine", [0.5, 1.0, 0.5])])
def test_lr_schedules(name, expect):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(name, opt, warmup=0 if name == "constant" else 2, total=4)
    seen = []
    for _ in range(3):
        opt.step()
        sched.step()
        seen.append(round(sched.get_last_lr()[0], 3))
    assert seen == expect


def test_min_snr_weights_cap_the_easy_timesteps():
    from diffusers import DDPMScheduler

    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    w = min_snr_weights(ac, torch.tensor([1, 500, 999]), 5.0, "epsilon")
    assert w[0] < 0.01 and w[2] == 1.0


@pytest.mark.parametrize("over", [
    {"train.loss": "l1"}, {"train.loss": "huber"}, {"train.loss": "smooth_l1"},
    {"train.min_snr_gamma": 5.0, "train.noise_offset": 0.05},
    {"model.prediction_type": "v_prediction"},
    {"train.mixed_precision": "bf16"},
    {"train.gradient_checkpointing": True, "network.train_text_encoder": True},
    {"train.gradient_accumulation": 2, "train.batch_size": 2, "train.max_grad_norm": 0.5},
    {"network.targets": "all", "dataset.bucketing": False, "dataset.resize": "pad"},
    {"dataset.shuffle_tags": True, "dataset.keep_tokens": 1, "dataset.caption_prefix": "lablora"},
    {"train.lr_scheduler": "cosine", "train.warmup_steps": 1, "train.optimizer": "adamw"},
    {"train.channels_last": True},
])
def test_loop_options_run_with_finite_loss(over, demo_dir, tmp_path):
    run = run_job(tiny_config(demo_dir, name="opt", **{"train.steps": 3, **over}), tmp_path)
    assert run.status()["state"] == "completed"
    assert len(losses(run)) == 3 and all(math.isfinite(x) for x in losses(run))


def test_loss_kinds_give_different_values(demo_dir, tmp_path):
    a = losses(run_job(tiny_config(demo_dir, name="a", **{"train.steps": 2}), tmp_path))
    b = losses(run_job(tiny_config(demo_dir, name="b", **{"train.steps": 2, "train.loss": "l1"}), tmp_path))
    assert a != b


def test_the_same_seed_repeats_a_cpu_run_exactly_and_another_seed_does_not(demo_dir, tmp_path):
    over = {"train.steps": 4, "dataset.flip": True, "network.dropout": 0.1}
    a = losses(run_job(tiny_config(demo_dir, name="s1", **over), tmp_path))
    b = losses(run_job(tiny_config(demo_dir, name="s2", **over), tmp_path))
    c = losses(run_job(tiny_config(demo_dir, name="s3", **{**over, "train.seed": 7}), tmp_path))
    assert a == b and a != c


def test_problems_end_as_failed_with_advice(demo_dir, tmp_path):
    with pytest.raises(LoraLabError, match="batch_size 50 is larger"):
        run_job(tiny_config(demo_dir, name="big", **{"train.batch_size": 50}), tmp_path)
    run = next((tmp_path / "runs").glob("big*"))
    import json

    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "failed" and "larger than the dataset" in st["error"] and st["advice"]
    with pytest.raises(LoraLabError, match="fp16 needs a GPU"):
        run_job(tiny_config(demo_dir, name="fp16", **{"train.mixed_precision": "fp16"}), tmp_path)


def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(demo_dir, tmp_path):
    with pytest.raises(LoraLabError, match="Lower the learning rate"):
        run_job(tiny_config(demo_dir, name="nan", **{"train.steps": 40, "train.learning_rate": 10.0,
                                                     "train.optimizer": "adam", "train.max_grad_norm": 0.0,
                                                     "save.every_n_steps": 1}), tmp_path)
    import json

    run = next((tmp_path / "runs").glob("nan*"))
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "failed" and "learning_rate" in st["advice"]
    assert list((run / "checkpoints").glob("step-*"))


def test_compile_is_not_used_on_the_cpu_where_it_loses_gradients(demo_dir, tmp_path):
    """torch.compile's CPU code gave the mid block's LoRA no gradient (tests/bench/check_compile.py):
    on the CPU, train.compile is left out with a line in the log, and the run learns as without it."""
    over = {"train.steps": 3, "dataset.bucketing": False}
    plain = run_job(tiny_config(demo_dir, name="plain", **over), tmp_path)
    asked = run_job(tiny_config(demo_dir, name="asked", **{**over, "train.compile": True}), tmp_path)
    assert losses(asked) == losses(plain)
    assert "train.compile: not used on the CPU" in asked.log_path.read_text()
