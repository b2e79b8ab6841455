"""bf16 as on a GPU, run on the CPU: frozen weights in bf16, LoRA weights in fp32, sampling with
text encoders and VAE in other formats than the UNet (what a GPU user's run and Test tab do)."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from trainer.loop import run_job
from trainer.models.load import load_base
from trainer.precision import for_capability, mixed_precision
from trainer.sampling import generate


def pixels(img) -> np.ndarray:
    return np.asarray(img).astype(float)


@pytest.mark.parametrize("spec", ["tiny-random", "tiny-random-xl"])
def test_a_bf16_unet_draws_the_picture_fp32_draws(spec):
    model = load_base(spec)
    full = pixels(generate(model, ["a red square"], seed=3, steps=4)[0])
    model.unet.to(torch.bfloat16)  # as during training: only the UNet is cast
    mixed = pixels(generate(model, ["a red square"], seed=3, steps=4)[0])
    for te in model.text_encoders:  # as in the Test tab on a GPU: text encoders too
        te.to(torch.bfloat16)
    half = pixels(generate(model, ["a red square"], seed=3, steps=4)[0])
    assert full.std() > 10  # a picture, not a flat or black square
    assert np.abs(full - mixed).mean() < 4 and np.abs(full - half).mean() < 4  # of 255


def test_auto_precision_follows_the_card():
    assert [for_capability(m) for m in (9, 8, 7, 6)] == ["bf16", "bf16", "fp16", "fp32"]
    assert mixed_precision("auto", torch.device("cpu")) == "fp32"
    assert mixed_precision("bf16", torch.device("cpu")) == "bf16"


def test_bf16_training_samples_and_exports_a_working_lora(demo_dir, tmp_path):
    cfg = tiny_config(demo_dir, name="bf", **{"model.base": "tiny-random-xl", "train.steps": 4,
                                              "train.mixed_precision": "bf16", "train.learning_rate": 1e-2,
                                              "train.gradient_checkpointing": True,
                                              "sample.prompts": ["a red square"], "sample.every_n_steps": 2})
    run = run_job(cfg, tmp_path)
    assert run.status()["state"] == "completed"
    samples = sorted(run.samples_dir.glob("*.png"))
    assert [p.name for p in samples] == ["step000002_00.png", "step000004_00.png"]
    assert pixels(Image.open(samples[-1])).std() > 10
    model = load_base("tiny-random-xl")
    base = pixels(generate(model, ["a red square"], seed=1, steps=4)[0])
    tuned = pixels(generate(model, ["a red square"], seed=1, steps=4, loras=[(run.lora_path("bf"), 1.0)])[0])
    assert np.abs(base - tuned).mean() > 1  # the bf16-trained LoRA changes the picture


def test_skipping_peft_input_casts_changes_no_gradient():
    """The engine turns off peft's cast of each layer's input to fp32 under autocast (+7 % steps/s
    on a GPU); the adapter's gradients must stay exactly what they were."""
    from trainer.adapters import adapter_parameters, add_adapter, skip_input_casts
    from trainer.config import NetworkConfig

    def grads(skip: bool) -> list[torch.Tensor]:
        unet = load_base("tiny-random").unet.to(torch.bfloat16).requires_grad_(False)
        torch.manual_seed(0)  # peft draws lora_A from the global generator
        add_adapter(unet, NetworkConfig(rank=4, alpha=4))
        if skip:
            assert skip_input_casts(unet, "lora") > 0
        for p in adapter_parameters(unet):
            p.data = p.data.float()
            if p.ndim == 2 and p.abs().max() == 0:  # lora_B starts at zero: give lora_A a gradient too
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(p.numel()))
        g = torch.Generator().manual_seed(0)
        lat, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(lat, torch.tensor([10, 500]), emb).sample
        out.float().pow(2).mean().backward()
        return [p.grad for p in adapter_parameters(unet)]

    plain, skipped = grads(False), grads(True)
    assert all(g is not None and g.abs().max() > 0 for g in skipped)
    assert all(torch.equal(a, b) for a, b in zip(plain, skipped))


@pytest.mark.parametrize("algorithm", ["dora", "loha", "lokr", "oft"])
def test_input_casts_stay_for_adapters_computed_outside_matmuls(algorithm):
    from trainer.adapters import add_adapter, skip_input_casts
    from trainer.config import NetworkConfig

    unet = load_base("tiny-random").unet
    add_adapter(unet, NetworkConfig(algorithm=algorithm, rank=4, alpha=4))
    assert skip_input_casts(unet, algorithm) == 0
