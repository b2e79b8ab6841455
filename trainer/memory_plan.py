"""Accelerator memory a run needs, phase by phase, and the setting that makes it fit a card.

A run goes through four phases, one after another, and its peak is the largest of them:
  caching   the VAE (fp32) encodes the images and the text encoders the captions; the UNet is not there yet
  loading   the UNet (with its adapter) comes to the device
  training  the UNet's weights (as stored), the adapter, its gradients, optimizer state and EMA, activations
  sampling  during training: the UNet stays; the text encoders come for the prompts and leave; then the
            VAE decodes each image
Figures in GB for the full-size models, from tests/bench/bench_memory.py (fake tensors: shapes, no numbers).
"""
from __future__ import annotations

BYTES = {"bf16": 2, "fp16": 2, "fp8_e4m3fn": 1, "fp8_e5m2": 1}  # per weight, each model.weight_dtype but auto
# bf16/fp16 weights of the whole model part
UNET_GB = {"sd15": 1.6, "sd2": 1.6, "sdxl": 4.8, "tiny": 0.01}
TEXT_GB = {"sd15": 0.23, "sd2": 0.68, "sdxl": 1.64, "tiny": 0.01}  # all text encoders
TEXT_LARGEST_GB = {"sd15": 0.23, "sd2": 0.68, "sdxl": 1.39, "tiny": 0.01}  # the largest one (SDXL: OpenCLIP bigG)
VAE_GB = {"tiny": 0.001}  # else 0.16 (the same VAE for every family)
LORA_RANK16 = {"sd15": 3.2e6, "sd2": 3.3e6, "sdxl": 23.2e6, "tiny": 1e4}  # weights, attention targets
# per 512² image of batch: training activations without / with checkpointing, and a VAE decode (bf16)
ACT_GB = {"sd15": (1.09, 0.25), "sd2": (1.05, 0.22), "sdxl": (1.82, 0.17), "tiny": (0.01, 0.01)}
# with train.checkpoint_depth=layer: the norms between the parts keep their outputs (fp32 under autocast)
ACT_LAYER_GB = {"sd15": 0.44, "sd2": 0.41, "sdxl": 0.71, "tiny": 0.01}
DECODE_GB = {"tiny": 0.005}  # else 0.36
ENCODE_GB = {"tiny": 0.005}  # else 0.62: the VAE encoding one 512² image in fp32 (caching)
CONTEXT_GB = 0.4  # the CUDA context and library workspaces
OPT_BYTES = {"adamw8bit": 2, "prodigy": 16, "sgd": 4, "adafactor": 4}  # state per trained weight; else 8
# Share of the UNet's weights in the layers model.weight_dtype stores (trainer/base_weights.py), in the
# blocks offload=blocks moves, and in the two largest blocks (the one running and the next one coming).
STORED_SHARE = {"sd15": 0.967, "sd2": 0.967, "sdxl": 0.990, "tiny": 0.9}
BLOCKS = {"sd15": (38, 0.908, 0.114), "sd2": (38, 0.908, 0.114), "sdxl": (87, 0.979, 0.038), "tiny": (18, 0.9, 0.2)}


def _unet_gb(cfg, family: str, half: float) -> float:
    """The UNet's weights on the device while training (stored format, offloading)."""
    t = cfg.train
    stored = BYTES.get(cfg.model.weight_dtype) or 2 * half  # bytes per weight; auto: the training precision
    share = STORED_SHARE[family]
    whole = UNET_GB[family] * (share * stored / 2 + (1 - share) * half)
    if t.offload != "blocks":
        return whole
    n, in_blocks, top2 = BLOCKS[family]
    kept = min(t.offload_blocks, n) * in_blocks / n
    return whole * (1 - in_blocks + min(in_blocks, top2 + kept))


def phases(cfg, family: str) -> dict[str, float]:
    """GB per phase (sampling only when prompts are set), each with the CUDA context."""
    t, d, net = cfg.train, cfg.dataset, cfg.network
    family = family if family in UNET_GB else "sd15"
    half = 2 if t.mixed_precision == "fp32" else 1  # fp32 weights take twice the space
    area = (d.resolution / 512) ** 2
    s = cfg.sample
    sample_area = (s.width or d.resolution) * (s.height or d.resolution) / 512**2
    lora = LORA_RANK16[family] * net.rank / 16 * (3 if net.targets == "all" else 1)
    ema = 4 if t.ema and not t.ema_on_cpu else 0
    state = lora * (4 + 4 + ema + OPT_BYTES.get(t.optimizer, 8)) / 1024**3  # weights, gradients, EMA, optimizer
    text_cached = d.cache_text_embeddings and not net.train_text_encoder and not d.shuffle_tags
    checkpointed = t.gradient_checkpointing or t.offload == "blocks"
    act = (ACT_LAYER_GB[family] if checkpointed and t.checkpoint_depth == "layer" else
           ACT_GB[family][1 if checkpointed else 0]) * area * t.batch_size
    unet = _unet_gb(cfg, family, half)
    text_stored = (BYTES.get(cfg.model.weight_dtype) or 2 * half) / 2 if net.train_text_encoder else half
    text_train = 0 if text_cached else TEXT_GB[family] * text_stored
    vae_w, decode, encode = VAE_GB.get(family, 0.16), DECODE_GB.get(family, 0.36), ENCODE_GB.get(family, 0.62)
    out = {
        # in fp32: the VAE, done (and gone) before the text encoders come, one at a time
        "caching": max(vae_w * 2 + encode * area, TEXT_LARGEST_GB[family] * 2 if text_cached else 0),
        "loading": unet + text_train,
        "training": unet + state + act + text_train,
    }
    if t.offload == "none" and not text_train:  # the text encoders stay on the device after caching
        text_train = TEXT_GB[family] * half
        out["training"] += text_train
    if cfg.sample.prompts:
        vae = vae_w * half + decode * half * sample_area
        # the text encoders come for the prompts (unless they are there) and leave before the VAE decodes
        out["sampling"] = unet + state + text_train + max(0 if text_train else TEXT_GB[family] * half, vae)
    return {k: round(CONTEXT_GB + v, 2) for k, v in out.items()}


def peak_gb(cfg, family: str) -> float:
    return round(max(phases(cfg, family).values()), 1)


# What lowers the peak, in the order a user would give up least: (description, change to the config).
SAVINGS = [
    ("train.ema_on_cpu=true", lambda c: setattr(c.train, "ema_on_cpu", True)),
    ("train.gradient_checkpointing=true", lambda c: setattr(c.train, "gradient_checkpointing", True)),
    ("model.weight_dtype=fp8_e4m3fn", lambda c: setattr(c.model, "weight_dtype", "fp8_e4m3fn")),
    ("train.optimizer=adamw8bit", lambda c: setattr(c.train, "optimizer", "adamw8bit")),
    ("network.train_text_encoder=false", lambda c: setattr(c.network, "train_text_encoder", False)),
    ("train.batch_size=1", lambda c: setattr(c.train, "batch_size", 1)),
    ("train.offload=blocks", lambda c: setattr(c.train, "offload", "blocks")),
    ("dataset.resolution=768", lambda c: setattr(c.dataset, "resolution", min(c.dataset.resolution, 768))),
    ("dataset.resolution=512", lambda c: setattr(c.dataset, "resolution", min(c.dataset.resolution, 512))),
]


def fitting_settings(cfg, family: str, card_gb: float) -> list[str] | None:
    """Changes from SAVINGS after which the run fits `card_gb` with 5 % to spare: taken in order until it fits,
    then each one dropped again that the others make unneeded. [] when it fits already, None when even all of
    them are not enough."""
    import copy

    budget = card_gb * 0.95

    def peak(labels) -> float:
        trial = copy.deepcopy(cfg)
        for label, change in SAVINGS:
            if label in labels:
                change(trial)
        return peak_gb(trial, family)

    if peak([]) <= budget:
        return []
    taken = []
    for label, _ in SAVINGS:
        if peak(taken + [label]) < peak(taken):
            taken.append(label)
        if peak(taken) <= budget:
            for unneeded in reversed(list(taken)):
                if len(taken) > 1 and peak([t for t in taken if t != unneeded]) <= budget:
                    taken.remove(unneeded)
            return taken
    return None


def fit_warning(cfg, family: str, card_gb: float) -> str | None:
    need = fitting_settings(cfg, family, card_gb)
    if need == []:
        return None
    peak = peak_gb(cfg, family)
    phase = max(phases(cfg, family).items(), key=lambda kv: kv[1])[0]
    head = f"This run needs about {peak} GB ({phase}), more than this {card_gb:.1f} GB card has."
    if need is None:
        return head + " Even with every memory saving on it would not fit: use a smaller model or a larger card."
    return head + f" It fits with {', '.join(need)}."


def option_warnings(cfg, on_cpu: bool) -> list[str]:
    """Memory options that will not do what they say with the rest of the settings."""
    t, out = cfg.train, []
    if t.offload == "blocks":
        if on_cpu:
            out.append("train.offload=blocks saves nothing on the CPU (the weights are in main memory either way); "
                       "it is for GPUs.")
        if t.compile == "on":
            out.append("train.compile is not used with train.offload=blocks (the blocks' weights move while it runs).")
        if t.channels_last:
            out.append("train.channels_last is not used with train.offload=blocks.")
    if t.checkpoint_depth == "layer" and (t.gradient_checkpointing or t.offload == "blocks"):
        out.append("train.checkpoint_depth=layer keeps the norms' outputs between the parts: it needs more memory "
                   "than block at small batches (SDXL 1024 px: +1.0 GB).")
    return out


def spill_warning(reserved: int, total: int, windows: bool) -> str | None:
    """NVIDIA's Windows driver lends shared system memory when the card is full, instead of failing: a run then
    goes on many times slower. More reserved than the card has means that is happening."""
    if total and reserved > total:
        where = "the driver is lending shared system memory" if windows else "memory is being oversubscribed"
        return (f"GPU memory in use ({reserved / 1024**3:.1f} GB) is more than the card has ({total / 1024**3:.1f} GB): "
                f"{where}, and each step runs many times slower. Stop, and turn on a memory saving "
                "(Check settings says which fits).")
    return None
