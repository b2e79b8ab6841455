"""network.init_weights: how a new LoRA starts — gaussian (diffusers' scripts) or kaiming (kohya sd-scripts)."""
import math

import pytest
import torch

from conftest import tiny_config
from trainer.adapters import add_adapter
from trainer.config import NetworkConfig
from trainer.lora_file import AppliedLoras
from trainer.loop import run_job
from trainer.models.load import load_base


def _down_halves(unet):
    """(lora_A weight, its layer's inputs per output) of every LoRA layer, and every lora_B weight."""
    downs, ups = [], []
    for name, p in unet.named_parameters():
        if ".lora_A." in name:
            downs.append((p.detach(), p[0].numel()))
        elif ".lora_B." in name:
            ups.append(p.detach())
    return downs, ups


@pytest.mark.parametrize("algorithm", ["lora", "dora"])
def test_kaiming_draws_the_down_half_as_sd_scripts_does_and_gaussian_with_std_one_over_rank(algorithm):
    rank = 4
    spread = {}
    for init in ("gaussian", "kaiming"):
        unet = load_base("tiny-random").unet
        torch.manual_seed(0)
        add_adapter(unet, NetworkConfig(algorithm=algorithm, rank=rank, alpha=rank, targets="all",
                                        init_weights=init))
        downs, ups = _down_halves(unet)
        assert downs and all(not u.any() for u in ups)  # the up half starts at zero: the model is unchanged
        # sd-scripts' LoRAModule: kaiming_uniform_(a=sqrt(5)) — uniform within ±1/sqrt(fan_in), std 1/sqrt(3 fan_in)
        ratios = []
        for w, fan_in in downs:
            if init == "kaiming":
                assert w.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
                ratios.append(w.std().item() * math.sqrt(3 * fan_in))
            else:
                ratios.append(w.std().item() * rank)
        spread[init] = sum(ratios) / len(ratios)
        assert 0.85 < spread[init] < 1.15, (init, spread[init])


def test_kaiming_moves_the_lora_less_at_the_same_learning_rate(demo_dir, tmp_path):
    base = load_base("tiny-random")
    change = {}
    for init in ("gaussian", "kaiming"):
        cfg = tiny_config(demo_dir, name=f"init-{init}", **{"network.init_weights": init, "train.steps": 10,
                                                           "train.seed": 3})
        run = run_job(cfg, tmp_path / init)
        assert run.status()["state"] == "completed"
        assert run.config_path.read_text().count(f"init_weights: {init}") == 1  # the run folder records it
        before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
        applied = AppliedLoras(base, [(run.lora_path(f"init-{init}"), 1.0)])  # the file merged, as the Test tab does
        change[init] = math.sqrt(sum((p.detach() - before[n]).pow(2).sum().item()
                                     for n, p in base.unet.named_parameters()))
        applied.remove()
        assert change[init] > 0
    # the tiny model's layers take 32-64 inputs: kaiming's down half is 2-3 times smaller than gaussian's (1/4)
    assert change["kaiming"] < change["gaussian"] / 1.5, change
