"""LoRA Lab's LoHa, LoKr, OFT (`diff`) and DoRA files read by LyCORIS' own loader.

sd-scripts reads these files through LyCORIS (`ss_network_module` = `lycoris.kohya`), whose
`create_network_from_weights` builds each layer's module from the file's tensors with
`lycoris.modules.get_module` / `make_module`. `lycoris.create_lycoris_from_weights` is the same
loader for any torch module (its layer names start `lycoris_` where kohya's start `lora_unet_` /
`lora_te_`); it is used here because `lycoris.kohya.create_network_from_weights` (4.1) stops on
diffusers' and sd-scripts' SD UNets before reading a file ("duplicated lora name:
lora_unet_time_embedding_linear_1": its default targets name time_embedding.linear_1 and, for
Anima, the TimestepEmbedding class that holds it).

Each test builds a file with the project's export code from a tiny model whose adapter weights were
all moved off their starting values, lets LyCORIS load every layer and merge it into the base
weights, and checks each layer's change against the change peft merges (what was trained) and the
one the project's own reader (trainer/lora_file.py) applies. lycoris-lora is a test requirement: if
it is missing these tests fail, they do not skip.
"""
import copy

import pytest
import torch
from lycoris import create_lycoris_from_weights
from lycoris.modules import get_module, make_module
from safetensors.torch import load_file

from helpers import unet_output
from trainer.adapters import ADAPTER, adapter_layers, add_adapter
from trainer.config import NetworkConfig
from trainer.export import adapter_file_tensors, kohya_key, layer_tensors, named_parts, save_file_atomic
from trainer.lora_file import AppliedLoras, delta_weight
from trainer.models.load import load_base

RANK, ALPHA = 4, 3.0  # alpha ≠ rank, so every alpha/rank convention is exercised
# Adapter weights get N(0, (SCALE / sqrt(fan_in))^2): weight changes of a few percent.
SCALE = {"loha": 1.0, "lokr": 0.6, "oft": 0.3, "dora": 0.3}
TOL = 1e-5  # relative error of a layer's change, fp32 file

# LyCORIS' LohaModule/LokrModule.get_diff_weight (what merge_to uses) multiply get_weight(), already scaled by
# alpha/rank, by alpha/rank again; their forward scales once, as peft and ComfyUI do. Only a file whose
# alpha/rank is 1 merges right, so export folds alpha/rank into hada_w1_a / lokr_w1 and writes alpha = rank.


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny-random")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def merged_change(layer) -> torch.Tensor:
    """The change peft's own merge makes to the layer's weight (put back after)."""
    weight = layer.get_base_layer().weight
    before = weight.data.clone()
    layer.merge(adapter_names=[ADAPTER])
    change = weight.data - before
    weight.data.copy_(before)
    layer.merged_adapters.clear()
    return change


def give_random_values(layer, algorithm: str, gen: torch.Generator) -> None:
    for name, p in layer.named_parameters():
        if "base_layer" in name:
            continue
        if "lora_magnitude_vector" in name:
            p.data.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.data = torch.randn(p.shape, generator=gen) * (SCALE[algorithm] / fan_in ** 0.5)


def written_file(tiny, algorithm: str, tmp_path):
    """(bare model, file, {layer: change peft merges}): a copy of the tiny model gets the adapter on every
    UNet target ("all") and the text encoder, random adapter weights, the file as a run exports it, and
    its plain layers back."""
    model = copy.deepcopy(tiny)
    net = NetworkConfig(algorithm=algorithm, rank=RANK, alpha=ALPHA, targets="all", train_text_encoder=True)
    add_adapter(model.unet, net)
    for te in model.text_encoders:
        add_adapter(te, net, text_encoder=True)
    gen = torch.Generator().manual_seed(0)
    for _, part in named_parts(model):
        for _, layer in adapter_layers(part):
            give_random_values(layer, algorithm, gen)
    path = save_file_atomic(adapter_file_tensors(model, model.family, algorithm, ALPHA),
                            tmp_path / f"{algorithm}.safetensors", {}, "fp32")
    trained = {}
    for prefix, part in named_parts(model):
        for name, layer in adapter_layers(part):
            trained[kohya_key(prefix, name)] = merged_change(layer)
            parent, _, child = name.rpartition(".")
            setattr(part.get_submodule(parent) if parent else part, child, layer.get_base_layer())
    return model, path, trained


def lycoris_networks(model, path):
    """[(network, {LyCORIS layer name: file layer name}, file tensors under LyCORIS' names)] per model part."""
    sd = load_file(str(path))
    out = []
    for prefix, part in named_parts(model):
        names = {kohya_key(prefix, n): f"lycoris_{n}".replace(".", "_") for n, _ in part.named_modules() if n}
        mine = {f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in sd.items() if k.split(".")[0] in names}
        if mine:
            network, _ = create_lycoris_from_weights(1.0, str(path), part, weights_sd=mine)
            out.append((network, {v: k for k, v in names.items()}, mine))
    assert sum(len(m) for _, _, m in out) == len(sd), "file keys that name no layer of the model"
    return out


def modules_by_file_name(model) -> dict[str, torch.nn.Module]:
    return {kohya_key(prefix, n): m for prefix, part in named_parts(model) for n, m in part.named_modules() if n}


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "oft", "dora"])
def test_lycoris_loads_every_layer_and_merges_what_was_trained(algorithm, tiny, tmp_path):
    model, path, trained = written_file(tiny, algorithm, tmp_path)
    modules = modules_by_file_name(model)
    saved = {k: (modules[k].weight.data.clone(), None if modules[k].bias is None else modules[k].bias.data.clone())
             for k in trained}

    loaded = {}
    for network, file_name, tensors in lycoris_networks(model, path):
        for lora in network.loras:
            keys = {k.split(".", 1)[1] for k in tensors if k.split(".")[0] == lora.lora_name}
            assert keys <= set(lora.state_dict()), (lora.lora_name, keys - set(lora.state_dict()))
            loaded[file_name[lora.lora_name]] = type(lora).__name__
        network.merge_to(1.0)
    assert sorted(loaded) == sorted(trained), set(trained) ^ set(loaded)
    by_lycoris = {k: modules[k].weight.data - saved[k][0] for k in trained}
    for k, (w, b) in saved.items():
        modules[k].weight.data.copy_(w)
        if b is not None:
            assert torch.equal(modules[k].bias.data, b), k  # no diff_b in our files: biases stay
    applied = AppliedLoras(model, [(path, 1.0)])
    by_reader = {k: modules[k].weight.data - saved[k][0] for k in trained}
    applied.remove()

    reader_err = max(rel(by_reader[k], t) for k, t in trained.items())
    assert reader_err < TOL, reader_err
    errors = {k: rel(by_lycoris[k], t) for k, t in trained.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, (worst, loaded[worst], errors[worst], sum(e >= TOL for e in errors.values()))


@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_lycoris_forward_with_our_file_is_the_trained_model(algorithm, tiny, tmp_path):
    """LyCORIS' forward (apply_to: how sd-scripts samples and trains without merging) scales a LoHa or
    LoKr layer by alpha/rank once, as peft does: the file gives the trained output there."""
    model, path, _ = written_file(tiny, algorithm, tmp_path)
    applied = AppliedLoras(model, [(path, 1.0)])
    expect = unet_output(model.unet, model)
    applied.remove()
    before = unet_output(model.unet, model)
    networks = lycoris_networks(model, path)
    for network, _, _ in networks:
        network.apply_to()
    got = unet_output(model.unet, model)
    for network, _, _ in networks:
        network.restore()
    assert (expect - before).abs().max() > 1e-2  # the file changes the output
    assert torch.allclose(got, expect, atol=1e-5), (got - expect).abs().max()


def test_lycoris_loads_a_lokr_3x3_conv_whose_factors_it_must_infer():
    """SD 1.5's up_blocks.2.resnets.0.conv1 and SDXL's up_blocks.1.resnets.0.conv1 (640 ← 1920, 3x3) at
    rank 8: peft splits 640 = 20·32 and 1920 = 40·48; LyCORIS' LokrModule.make_module_from_state_dict,
    reading 1920·9 from a decomposed w2, would infer factor 40 and build lokr_w1 (16, 40). The export
    writes that layer's w2 whole, which LyCORIS reads as it is."""
    from peft import LoKrConfig, inject_adapter_in_model

    torch.manual_seed(0)
    conv = torch.nn.utils.skip_init(torch.nn.Conv2d, 1920, 640, 3, padding=1)
    conv.weight.data.normal_(0, 0.02)
    model = torch.nn.Sequential(conv)
    inject_adapter_in_model(LoKrConfig(r=8, alpha=ALPHA, target_modules=["0"]), model, adapter_name=ADAPTER)
    layer = model[0]
    give_random_values(layer, "lokr", torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = merged_change(layer)
        tensors = {k: v.detach().clone() for k, v in layer_tensors(layer, "lokr", ALPHA).items()}
        assert rel(delta_weight(tensors, conv.weight), trained) < TOL
        kind, params = get_module({f"x.{k}": v for k, v in tensors.items()}, "x")
        module = make_module(kind, params, "x", conv)
        got = module.get_merged_weight(1.0, conv.weight.shape)[0] - conv.weight
    assert rel(got, trained) < TOL
