"""Write the trained adapter as one .safetensors file that ComfyUI, AUTOMATIC1111/Forge and diffusers load.

LoRA and DoRA use the kohya layout (`lora_unet_…`, `lora_te…`, `lora_down`/`lora_up`, `alpha`,
`dora_scale`); LoHa and LoKr the LyCORIS layout (`hada_*`, `lokr_*`). We write keys ourselves
rather than calling diffusers' `convert_state_dict_to_kohya`, which writes alpha = rank whatever
alpha was trained and half-renames DoRA magnitudes.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .adapters import ADAPTER, adapter_layers
from .ldm_names import block_pairs, to_ldm

BASE_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd15": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def te_prefixes(family: str, count: int) -> list[str]:
    return ["lora_te1_", "lora_te2_"] if family == "sdxl" else ["lora_te_"][:count]


def kohya_key(prefix: str, module_name: str) -> str:
    """`lora_unet_down_blocks_0_…`, `lora_te_text_model_encoder_layers_0_…`: the names every loader knows.

    transformers 5 flattened CLIPTextModel (no `text_model.` level); kohya files keep it.
    """
    if prefix.startswith("lora_te") and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return prefix + module_name.replace(".", "_")


def layer_names(model, prefix: str, module) -> dict[str, str]:
    """{module name: file layer name} for one part of a BaseModel.

    SDXL UNet layers take their original (SGM) names, `lora_unet_input_blocks_4_1_…`, as sd-scripts
    writes them: LyCORIS in sd-scripts builds its modules from those names and finds no others
    (kohya's networks.lora renames diffusers names, LyCORIS does not). SD 1.x/2.x files keep diffusers'
    names, which is what sd-scripts uses for them. Every other loader reads both.
    """
    pairs = block_pairs(module.config) if prefix == "lora_unet_" and model.family == "sdxl" else None
    return {name: kohya_key(prefix, to_ldm(name, pairs) if pairs else name) for name, _ in module.named_modules()}


def named_parts(model) -> list[tuple[str, object]]:
    """(kohya prefix, module) for the UNet and each text encoder of a BaseModel."""
    return [("lora_unet_", model.unet)] + list(zip(te_prefixes(model.family, len(model.text_encoders)),
                                                   model.text_encoders))


def _oft_diff(layer) -> torch.Tensor:
    # peft's OFT rotates a layer's *input* with a Cayley–Neumann approximation, while the LyCORIS
    # `oft_blocks` layout that ComfyUI reads rotates the *output* blocks with an exact Cayley
    # transform; one cannot be converted into the other. The weight difference (LyCORIS `diff`,
    # which ComfyUI also reads) reproduces the trained layer exactly.
    # Merged into an fp32 copy on the adapter's device, not into the weight as it is: a base stored in fp8
    # (model.weight_dtype) would round the merged weight, and an offloaded one waits in CPU memory.
    base = layer.get_base_layer()
    stored = base.weight.data
    before = stored.to(next(layer.oft_R.parameters()).device, torch.float32)
    base.weight.data = before.clone()
    try:
        layer.merge(adapter_names=[ADAPTER])
        after = base.weight.data.float()
    finally:
        base.weight.data = stored
        layer.merged_adapters.clear()
    return after - before


def layer_tensors(layer, algorithm: str, alpha: float) -> dict[str, torch.Tensor]:
    """The file tensors of one adapted layer, named by their key suffix."""
    if algorithm in ("lora", "dora"):
        down = layer.lora_A[ADAPTER].weight
        out = {"lora_down.weight": down, "lora_up.weight": layer.lora_B[ADAPTER].weight,
               "alpha": torch.tensor(float(alpha))}
        if algorithm == "dora":
            # (out, 1[, 1, 1]): the output-axis layout ComfyUI and LyCORIS read (peft keeps (out,)).
            mag = layer.lora_magnitude_vector[ADAPTER].weight
            out["dora_scale"] = mag.reshape(-1, *[1] * (down.dim() - 1))
        return out
    if algorithm == "loha":
        # LyCORIS' merge (`get_diff_weight`, what sd-scripts' merge uses) scales by alpha/rank twice, its
        # forward and ComfyUI once: with alpha/rank folded into the first factor and alpha = rank all agree.
        out = {k: getattr(layer, k)[ADAPTER] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        rank = layer.r[ADAPTER]
        out["hada_w1_a"] = out["hada_w1_a"] * (alpha / rank)
        out["alpha"] = torch.tensor(float(rank))
        return out
    if algorithm == "lokr":
        return _lokr_tensors(layer, alpha)
    if algorithm == "oft":
        return {"diff": _oft_diff(layer)}
    raise ValueError(algorithm)


def _lyco_split(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' `factorization`: dim = m × n, m ≤ n, m the largest divisor ≤ sqrt(dim) (or ≤ factor)."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))
    cap = dim if factor < 0 else factor
    m = max(d for d in range(1, int(dim ** 0.5) + 1) if dim % d == 0 and d <= cap)
    return m, dim // m


def _lycoris_reads_factors(w1_shape, w2_rows: int, w2_cols: int, out_dim: int, in_dim: int) -> bool:
    """Whether LyCORIS' LokrModule.make_module_from_state_dict rebuilds these factor shapes: it infers the
    factor from the tensors (taking w2_b's columns, d·k·k for a k×k conv, as the input factor), then
    splits the layer's real sizes with it."""
    a, c = w1_shape
    seen_out, seen_in = a * w2_rows, c * w2_cols
    if (a, c) == (_lyco_split(seen_out)[0], _lyco_split(seen_in)[0]):
        factor = -1
    else:
        f1, f2 = max(a, c), max(w2_rows, w2_cols)

        def ok(f):
            return seen_out % f == 0 and seen_in % f == 0 and f in (a, w2_rows) and f in (c, w2_cols)
        factor = f1 if ok(f1) else f2 if ok(f2) else min(f1, f2)
    return tuple(w1_shape) == (_lyco_split(out_dim, factor)[0], _lyco_split(in_dim, factor)[0])


def _lokr_tensors(layer, alpha: float) -> dict[str, torch.Tensor]:
    """LoKr factors as LyCORIS rebuilds them (peft and LyCORIS factorise alike with factor -1), alpha/rank
    folded into w1 and alpha = the decomposed dim, so every reader's scale is 1 (ComfyUI and LyCORIS'
    forward apply alpha only to decomposed factors, LyCORIS' merge twice)."""
    out = {k: getattr(layer, k)[ADAPTER] for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                      "lokr_w2_b", "lokr_t2") if ADAPTER in getattr(layer, k, {})}
    w = layer.get_base_layer().weight
    w1 = out["lokr_w1"] if "lokr_w1" in out else out["lokr_w1_a"] @ out["lokr_w1_b"]
    if w.dim() == 4 and w.shape[2:].numel() > 1 and "lokr_w2_b" in out and "lokr_t2" not in out \
            and not _lycoris_reads_factors(tuple(w1.shape), out["lokr_w2_a"].shape[0], out["lokr_w2_b"].shape[1],
                                           w.shape[0], w.shape[1]):
        # LyCORIS misreads a k×k conv's decomposed w2 for some shapes (SD's 640 ← 1920 3×3 conv at rank ≤ 23):
        # there w2 is written whole.
        rows = out["lokr_w2_a"].shape[0]
        out["lokr_w2"] = (out.pop("lokr_w2_a") @ out.pop("lokr_w2_b")).reshape(rows, -1, *w.shape[2:])
    key = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
    out[key] = out[key] * (alpha / layer.r[ADAPTER])
    dim = out["lokr_w2_b"].shape[0] if "lokr_w2_b" in out else out["lokr_w1_b"].shape[0] if "lokr_w1_b" in out else 1
    out["alpha"] = torch.tensor(float(dim))
    return out


def adapter_file_tensors(model, family: str, algorithm: str, alpha: float) -> dict[str, torch.Tensor]:
    """All file tensors from a BaseModel whose UNet (and maybe text encoders) hold an adapter."""
    out = {}
    for prefix, module in named_parts(model):
        names = layer_names(model, prefix, module)
        for name, layer in adapter_layers(module):
            key = names[name]
            for suffix, t in layer_tensors(layer, algorithm, alpha).items():
                out[f"{key}.{suffix}"] = t
    return out


def tag_frequency(captions: list[str]) -> dict:
    counts = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    return dict(counts.most_common(500))


def dataset_folders(source: str, names: list[str], captions: list[str], repeats: list[int]) -> dict:
    """{folder: {n_repeats, img_count, captions}} as sd-scripts groups a dataset (kohya `N_name` folders)."""
    out: dict[str, dict] = {}
    whole = Path(source).name or "dataset"
    for name, caption, rep in zip(names, captions, repeats):
        parts = Path(name).parts
        folder = parts[0] if len(parts) > 1 else whole
        d = out.setdefault(folder, {"n_repeats": rep, "img_count": 0, "captions": []})
        d["img_count"] += 1
        d["captions"].append(caption)
    return out


def file_alpha(net) -> float:
    """The alpha the file's layers carry: LoHa and LoKr files have alpha/rank folded into their weights."""
    return float(net.rank) if net.algorithm in ("loha", "lokr") else net.alpha


PRESETS = {"attention": "attn-only", "attention_ff": "attn-mlp", "all": "full"}


def network_module_and_args(net) -> tuple[str, dict]:
    """kohya's `ss_network_module` and `ss_network_args`: the module that reads the file as written.

    Plain LoRA is kohya's `networks.lora` (3x3 convolutions as LoCon with conv_dim). DoRA's
    `dora_scale` is read by LyCORIS only (kohya's networks.lora ignores it); LoHa, LoKr and full
    (`diff`) layers are LyCORIS modules too.
    """
    conv = {"conv_dim": str(net.rank), "conv_alpha": str(file_alpha(net))} if net.targets == "all" else {}
    if net.algorithm == "lora":
        return "networks.lora", conv
    algo = {"dora": "lora", "oft": "full"}.get(net.algorithm, net.algorithm)
    args = {"algo": algo, "preset": PRESETS[net.targets], **conv}
    if net.algorithm == "dora":
        args.update({"dora_wd": "True", "wd_on_output": "True"})
    return "lycoris.kohya", args


def metadata(cfg, family: str, steps: int, captions: list[str], num_images: int, resolution,
             folders: dict | None = None, started_at: float | None = None,
             prediction_type: str = "epsilon") -> dict[str, str]:
    """The file's metadata: kohya's `ss_*` keys and the `modelspec.*` set, as AUTOMATIC1111/Forge,
    civitai and ComfyUI read them from sd-scripts' files, and the run's whole config."""
    import datetime
    import time

    net = cfg.network
    module, args = network_module_and_args(net)
    folders = folders or {"dataset": {"n_repeats": cfg.dataset.repeats, "img_count": num_images, "captions": captions}}
    trigger = cfg.dataset.caption_prefix.strip()
    started_at = started_at or time.time()
    arch = MODELSPEC_ARCH[family]
    if family == "sd2":
        arch = "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    meta = {
        "ss_base_model_version": BASE_VERSION[family], "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": Path(cfg.model.base).name, "ss_network_module": module,
        "ss_network_dim": str(net.rank), "ss_network_alpha": str(file_alpha(net)), "ss_network_args": json.dumps(args),
        "ss_network_dropout": str(net.dropout), "ss_resolution": str(tuple(resolution)),
        "ss_steps": str(steps), "ss_max_train_steps": str(cfg.train.steps), "ss_learning_rate": str(cfg.train.learning_rate),
        "ss_text_encoder_lr": str(net.text_encoder_lr or cfg.train.learning_rate) if net.train_text_encoder else "0",
        "ss_unet_lr": str(cfg.train.learning_rate), "ss_optimizer": cfg.train.optimizer,
        "ss_lr_scheduler": cfg.train.lr_scheduler, "ss_lr_warmup_steps": str(cfg.train.warmup_steps),
        "ss_batch_size_per_device": str(cfg.train.batch_size),
        "ss_total_batch_size": str(cfg.train.batch_size * cfg.train.gradient_accumulation),
        "ss_gradient_accumulation_steps": str(cfg.train.gradient_accumulation),
        "ss_gradient_checkpointing": str(cfg.train.gradient_checkpointing),
        "ss_max_grad_norm": str(cfg.train.max_grad_norm),
        "ss_num_train_images": str(sum(d["img_count"] * d["n_repeats"] for d in folders.values())),
        "ss_seed": str(cfg.train.seed), "ss_output_name": cfg.name,
        "ss_mixed_precision": cfg.train.mixed_precision, "ss_min_snr_gamma": str(cfg.train.min_snr_gamma),
        "ss_noise_offset": str(cfg.train.noise_offset), "ss_network_train_unet_only": str(not net.train_text_encoder),
        "ss_cache_latents": str(cfg.dataset.cache_latents), "ss_caption_dropout_rate": str(cfg.dataset.caption_dropout),
        "ss_flip_aug": str(cfg.dataset.flip), "ss_shuffle_caption": str(cfg.dataset.shuffle_tags),
        "ss_keep_tokens": str(cfg.dataset.keep_tokens), "ss_enable_bucket": str(cfg.dataset.bucketing),
        "ss_tag_frequency": json.dumps({k: tag_frequency(d["captions"]) for k, d in folders.items()}),
        "ss_dataset_dirs": json.dumps({k: {"n_repeats": d["n_repeats"], "img_count": d["img_count"]}
                                       for k, d in folders.items()}),
        "ss_dataset_size": str(num_images), "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(time.time()), "ss_trigger_word": trigger,
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch + "/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": cfg.name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(started_at)).isoformat(),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.description": f"{net.algorithm} rank {net.rank} trained with LoRA Lab for {steps} steps",
        "lora_lab_config": cfg.to_yaml(),
    }
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
        meta["modelspec.usage_hint"] = f"Put '{trigger}' in the prompt."
    return meta


def safetensors_hashes(data: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' `sshs_model_hash` and `sshs_legacy_hash` (what sd-webui-additional-networks and
    AUTOMATIC1111 index LoRAs by): the file serialised with its `ss_*` metadata only; the first hashes
    the tensor bytes after the header, the second 64 KiB from 1 MiB on."""
    import hashlib

    from safetensors.torch import save

    raw = save(data, {k: v for k, v in meta.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(raw[:8], "little")
    return hashlib.sha256(raw[header:]).hexdigest(), hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str], precision: str) -> Path:
    from safetensors.torch import save_file

    dtype = DTYPES[precision]
    data = {k: v.detach().to("cpu", torch.float32 if k.endswith(".alpha") else dtype).contiguous()
            for k, v in tensors.items()}
    if "ss_network_module" in meta:
        meta = dict(meta)
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(data, meta)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(data, str(tmp), metadata=meta)
    tmp.replace(path)
    return path
