"""Every algorithm's file, for every target set, with and without text encoders, for SD 1.x and SDXL
shapes, reloads to the output of the model that wrote it (LoRA and DoRA through diffusers too)."""
import pytest
import torch

from helpers import unet_output
from trainer.adapters import adapter_parameters, add_adapter
from trainer.config import Config
from trainer.export import adapter_file_tensors, save_file_atomic
from trainer.lora_file import AppliedLoras, load_into_diffusers
from trainer.models.load import load_base

CASES = [(kind, algorithm, targets, te) for kind in ("tiny-random", "tiny-random-xl")
         for algorithm in ("lora", "dora", "loha", "lokr", "oft") for targets in ("attention", "all")
         for te in (False, True)]


def adapted(kind, algorithm, targets, te):
    """A tiny base model with the adapter in, every adapter weight moved off its starting value."""
    net = Config().network
    net.algorithm, net.targets, net.rank, net.alpha, net.train_text_encoder = algorithm, targets, 4, 2.0, te
    model = load_base(kind)
    add_adapter(model.unet, net)
    parts = [model.unet]
    if te:
        for enc in model.text_encoders:
            add_adapter(enc, net, text_encoder=True)
            parts.append(enc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in parts:
            for p in adapter_parameters(part):
                p += torch.randn(p.shape, generator=g) * 0.05
    return model, net


@pytest.mark.parametrize("kind,algorithm,targets,te", CASES)
def test_the_file_reloads_to_the_output_of_the_model_that_wrote_it(kind, algorithm, targets, te, tmp_path):
    model, net = adapted(kind, algorithm, targets, te)
    expect = unet_output(model.unet, model)
    path = save_file_atomic(adapter_file_tensors(model, model.family, algorithm, net.alpha),
                            tmp_path / "x.safetensors", {}, "fp32")
    base = load_base(kind)
    before = unet_output(base.unet, base)
    assert not torch.allclose(before, expect, atol=1e-3)
    applied = AppliedLoras(base, [(path, 1.0)])
    got = unet_output(base.unet, base)
    assert torch.allclose(got, expect, atol=1e-4), (got - expect).abs().max()
    applied.remove()
    assert torch.allclose(unet_output(base.unet, base), before, atol=1e-6)
    if algorithm in ("lora", "dora"):
        from test_lora_formats import pipeline

        pipe = pipeline(kind)
        if algorithm == "lora":
            pipe.load_lora_weights(str(path))
        else:
            load_into_diffusers(pipe, path)
        tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind.endswith("xl") else [])
        got = unet_output(pipe.unet, load_base(kind), text_encoders=tes)
        assert torch.allclose(got, expect, atol=1e-4), ("diffusers", (got - expect).abs().max())
