"""LoRA files other tools write load in LoRA Lab and give those tools' own output.

Files are made here with diffusers' and peft's own save functions (as diffusers'
train_text_to_image_lora.py and peft users make them), and in ComfyUI's and sd-scripts' SDXL
naming from LoRA Lab's own files.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import tiny_config
from helpers import unet_output
from trainer.errors import LoraLabError
from trainer.export import kohya_key, named_parts
from trainer.lora_formats import layout
from trainer.ldm_names import unet_ldm_names
from trainer.lora_file import AppliedLoras, lora_info
from trainer.loop import run_job
from trainer.models.load import load_base
from trainer.models.tiny import build_tiny

UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]


def pipeline(kind="tiny-random"):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind.endswith("xl") else StableDiffusionPipeline
    extra = {} if kind.endswith("xl") else {"safety_checker": None, "feature_extractor": None,
                                            "requires_safety_checker": False}
    return cls(**build_tiny(kind), **extra)


def perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "lora_B" in name or "lora_magnitude" in name:
            p.data += torch.randn(p.shape, generator=g) * 0.05


def diffusers_script_file(folder, alpha=4, dora=False, unet_targets=UNET_ATTN, metadata=True):
    """A file as diffusers' LoRA training scripts write it (`save_lora_weights`, `unet.…lora.down.weight`)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline()
    unet_cfg = LoraConfig(r=4, lora_alpha=alpha, target_modules=unet_targets, init_lora_weights="gaussian",
                          use_dora=dora)
    te_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=TE_ATTN, init_lora_weights="gaussian", use_dora=dora)
    pipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, pipe.text_encoder)  # transformers 5's add_adapter wants peft ≥ 0.22
    perturb(pipe.unet, 1)
    perturb(pipe.text_encoder, 2)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        safe_serialization=True, unet_lora_adapter_metadata=unet_cfg.to_dict() if metadata else None,
        text_encoder_lora_adapter_metadata=te_cfg.to_dict() if metadata else None)
    made_with = unet_output(pipe.unet, load_base("tiny-random"), text_encoders=[pipe.text_encoder])
    return folder / "pytorch_lora_weights.safetensors", made_with


def diffusers_output(path, kind="tiny-random"):
    """What diffusers itself draws with the file: the UNet's prediction after `load_lora_weights`."""
    pipe = pipeline(kind)
    pipe.load_lora_weights(str(path))
    fresh = load_base(kind)
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind.endswith("xl") else [])
    return unet_output(pipe.unet, fresh, text_encoders=tes)


def lora_lab_output(path, kind="tiny-random"):
    base = load_base(kind)
    AppliedLoras(base, [(path, 1.0)])
    return unet_output(base.unet, base)


def keys_of(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys()), f.metadata() or {}


@pytest.mark.parametrize("alpha,dora,targets,metadata", [
    (4, False, UNET_ATTN, False),  # train_text_to_image_lora.py: alpha = rank, no adapter metadata
    (8, False, UNET_ATTN, True),  # alpha ≠ rank, read from the file's lora_adapter_metadata
    (4, True, UNET_ATTN + ["proj_in", "conv1"], True),  # DoRA, convolutions too
])
def test_a_diffusers_script_file_gives_diffusers_output(alpha, dora, targets, metadata, tmp_path):
    path, expect = diffusers_script_file(tmp_path, alpha, dora, targets, metadata)
    keys, _ = keys_of(path)
    assert any(k.startswith("unet.") and ".lora.down.weight" in k or ".lora_A." in k for k in keys)
    assert lora_info(path)["layout"] in ("diffusers", "peft")
    if not dora:  # diffusers 0.42 fails to reload its own DoRA files (UNet weights left on `meta`,
        # text-encoder magnitudes dropped as unexpected keys): there the model that wrote the file is the reference.
        assert torch.allclose(diffusers_output(path), expect, atol=1e-4)
    got = lora_lab_output(path)
    assert not torch.allclose(expect, unet_output(load_base("tiny-random").unet, load_base("tiny-random")), atol=1e-3)
    assert torch.allclose(got, expect, atol=1e-4), (got - expect).abs().max()


def test_a_peft_save_pretrained_file_gives_the_peft_models_output(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_base("tiny-random")
    model = get_peft_model(base.unet, LoraConfig(r=4, lora_alpha=6, target_modules=UNET_ATTN + ["proj_out"],
                                                 init_lora_weights="gaussian"))
    perturb(model, 3)
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    keys, _ = keys_of(path)
    assert keys[0].startswith("base_model.model.") and ".lora_A.weight" in keys[0] or ".lora_B.weight" in keys[0]
    expect = unet_output(model.base_model.model, base)
    assert torch.allclose(lora_lab_output(path), expect, atol=1e-4)


def test_files_in_comfyui_and_sd_scripts_sdxl_naming_load_like_our_own(tmp_path, demo_dir):
    """ComfyUI's SaveLoRA writes `diffusion_model.<original name>.lora_up.weight` (and `diff_b` for
    biases); sd-scripts' SDXL files `lora_unet_input_blocks_…`, diffusers' kohya conversion, ai-toolkit and
    OneTrainer's legacy layout `lora_unet_down_blocks_…`; OneTrainer's OMI layout `unet.input_blocks.4.1.…`,
    `clip_l.text_model.…`. All name the same layers. Our SD 1.x files use diffusers' names, our SDXL files
    the original ones, as sd-scripts writes each."""
    for kind in ("tiny-random", "tiny-random-xl"):
        run = run_job(tiny_config(demo_dir, name=kind, **{"model.base": kind, "network.targets": "all",
                                                           "network.train_text_encoder": True,
                                                           "train.steps": 3, "train.learning_rate": 1e-2}), tmp_path)
        ours = run.lora_path(kind)
        tensors = {}
        with safe_open(str(ours), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        names = unet_ldm_names(load_base(kind).unet)  # diffusers name: original name
        kohya = {"lora_unet_" + n.replace(".", "_"): n for n in names}
        sgm = {"lora_unet_" + o.replace(".", "_"): n for n, o in names.items()}
        unet_keys = {k.split(".")[0] for k in tensors if k.startswith("lora_unet_")}
        assert unet_keys <= set(sgm if kind.endswith("xl") else kohya), kind
        model = load_base(kind)
        te_dotted = {kohya_key(prefix, n): (n if n.startswith("text_model.") else "text_model." + n)
                     for prefix, te in named_parts(model)[1:] for n, _ in te.named_modules() if n}
        other, comfy, omi = {}, {}, {}
        for k, v in tensors.items():
            base, _, suffix = k.partition(".")
            if not base.startswith("lora_unet_"):
                other[k] = comfy[k] = v
                omi[("clip_g." if base.startswith("lora_te2_") else "clip_l.") + f"{te_dotted[base]}.{suffix}"] = v
                continue
            diffusers_name = kohya.get(base) or sgm[base]
            renamed = names[diffusers_name] if base in kohya else diffusers_name
            other["lora_unet_" + renamed.replace(".", "_") + "." + suffix] = v
            comfy[f"diffusion_model.{names[diffusers_name]}.{suffix}"] = v
            omi[f"unet.{names[diffusers_name]}.{suffix}"] = v
        assert any("input_blocks" in k for k in other) != kind.endswith("xl")
        expect = lora_lab_output(ours, kind)
        assert any(k.startswith("clip_l.") for k in omi)
        assert any(k.startswith("clip_g.") for k in omi) == kind.endswith("xl")
        assert layout(omi) == "OneTrainer (OMI)"
        for name, sd in (("other names", other), ("comfy", comfy), ("onetrainer omi", omi)):
            path = tmp_path / f"{kind}-{name}.safetensors"
            save_file(sd, str(path))
            assert torch.allclose(lora_lab_output(path, kind), expect, atol=1e-5), (kind, name)
    # A ComfyUI-trained file also changes biases (`diff_b`): they are applied and taken off again.
    base = load_base("tiny-random")
    conv = base.unet.conv_in
    path = tmp_path / "bias.safetensors"
    save_file({"diffusion_model.input_blocks.0.0.diff_b": torch.ones_like(conv.bias)}, str(path))
    before = conv.bias.detach().clone()
    applied = AppliedLoras(base, [(path, 0.5)])
    assert torch.allclose(conv.bias, before + 0.5)
    applied.remove()
    assert torch.equal(conv.bias, before)


def test_files_for_other_models_or_unknown_layouts_say_what_they_are(tmp_path):
    base = load_base("tiny-random")
    cases = {"flux": {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)},
             "odd": {"something.else": torch.zeros(2)}}
    says = {"flux": "transformer model", "odd": "unknown"}
    for name, sd in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
        with pytest.raises(LoraLabError) as e:
            AppliedLoras(base, [(path, 1.0)])
        assert says[name] in str(e.value) and "kohya, LyCORIS, diffusers, peft, ComfyUI and OneTrainer" in e.value.fix


def test_continuing_training_from_a_diffusers_file_starts_from_its_weights(demo_dir, tmp_path):
    path, _ = diffusers_script_file(tmp_path, alpha=4)
    cfg = tiny_config(demo_dir, name="cont", **{"network.init_from": str(path), "network.rank": 4,
                      "network.alpha": 4, "network.train_text_encoder": False, "train.steps": 1,
                      "train.learning_rate": 0.0})
    run = run_job(cfg, tmp_path)
    assert run.status()["state"] == "completed", run.log_path.read_text()[-2000:]
    got = lora_lab_output(run.lora_path("cont"))
    # Only the UNet part continues (the text encoder is not trained here): compare to diffusers with it alone.
    keys, meta = keys_of(path)
    unet_only = tmp_path / "unet-only.safetensors"
    with safe_open(str(path), "pt") as f:
        save_file({k: f.get_tensor(k) for k in keys if k.startswith("unet.")}, str(unet_only),
                  metadata={"lora_adapter_metadata": json.dumps({k: v for k, v in json.loads(
                      meta["lora_adapter_metadata"]).items() if k.startswith("unet.")})})
    assert torch.allclose(got, diffusers_output(unet_only), atol=1e-4)


def _pixels(gallery):
    """The first gallery image's pixels."""
    import numpy as np
    from PIL import Image

    item = gallery[0]
    path = item["image"]["path"] if isinstance(item.get("image"), dict) else item["image"]
    return np.asarray(Image.open(path), dtype=float)


def test_a_diffusers_file_works_in_the_test_tab_and_the_cli(tmp_path):
    import subprocess
    import sys

    import numpy as np
    from gradio_client import Client, handle_file

    from app_server import ROOT, AppServer

    path, _ = diffusers_script_file(tmp_path)
    out = tmp_path / "cli"
    for lora, folder in ((f"{path}:1.0", "with"), (None, "without")):
        args = [sys.executable, "-m", "trainer", "sample", "--base", "tiny-random", "--prompt", "lablora, a red circle",
                "--seed", "3", "--steps", "2", "--out", str(out / folder)] + (["--lora", lora] if lora else [])
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    a, b = (np.asarray(Image.open(next((out / f).glob("*.png"))), dtype=float) for f in ("with", "without"))
    assert np.abs(a - b).mean() > 0.5

    server = AppServer(tmp_path / "workspace")
    try:
        client = Client(server.url, verbose=False)
        message, first_slot, *_ = client.predict(handle_file(str(path)), api_name="/on_upload_1")
        assert message == "Added pytorch_lora_weights.safetensors.", message
        labels = [c[0] for c in client.predict(None, api_name="/on_refresh")[1]["choices"]]
        assert "pytorch_lora_weights.safetensors (diffusers file)" in labels, labels
        drawn = {}
        for lora in ("loras/pytorch_lora_weights.safetensors", None):
            message, gallery, *_ = client.predict("tiny-random", "lablora, a red circle", "", 3, 2, 7.0, 64, 64,
                                                  "euler_a", lora, None, None, 1, 1, 1, api_name="/on_generate")
            assert gallery, message
            drawn[lora] = _pixels(gallery)
        assert np.abs(drawn[None] - drawn["loras/pytorch_lora_weights.safetensors"]).mean() > 0.5
    finally:
        server.stop()


def test_lycoris_oft_blocks_give_lycoris_own_weights():
    """A LyCORIS (diag-)OFT layer, built by LyCORIS from a file's tensors, changes the weight as LoRA Lab computes."""
    from lycoris.modules.diag_oft import DiagOFTModule

    from trainer.lora_file import delta_weight

    torch.manual_seed(0)
    for layer in (torch.nn.Linear(32, 64), torch.nn.Conv2d(16, 32, 3)):
        blocks = torch.randn(layer.weight.shape[0] // 4, 4, 4) * 0.05  # LyCORIS: block count ≥ block size
        for alpha, rescale in ((0.0, None), (1e-3, None), (0.0, torch.rand(layer.weight.shape[0], *[1] * (
                layer.weight.dim() - 1)) + 0.5)):
            with torch.no_grad():
                module = DiagOFTModule.make_module_from_state_dict("x", layer, blocks, rescale, torch.tensor(alpha))
                expect, _ = module.get_diff_weight(shape=layer.weight.shape)
            p = {"oft_blocks": blocks, "alpha": torch.tensor(alpha), **({"rescale": rescale} if rescale is not None
                                                                         else {})}
            got = delta_weight(p, layer.weight.data)
            assert got.abs().max() > 1e-3
            assert torch.allclose(got, expect.float(), atol=1e-5), (got - expect).abs().max()


def test_lycoris_locon_with_a_tucker_core_gives_lycoris_own_weights():
    from lycoris.modules.locon import LoConModule

    from trainer.lora_file import delta_weight

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3)
    up, down, mid = torch.randn(32, 4, 1, 1), torch.randn(4, 16, 1, 1), torch.randn(4, 4, 3, 3)
    with torch.no_grad():
        module = LoConModule.make_module_from_state_dict("x", conv, up, down, mid, torch.tensor(2.0), None)
        expect, _ = module.get_diff_weight(shape=conv.weight.shape)
    got = delta_weight({"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid,
                        "alpha": torch.tensor(2.0)}, conv.weight.data)
    assert torch.allclose(got, expect, atol=1e-4), (got - expect).abs().max()
