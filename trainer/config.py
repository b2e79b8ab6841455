"""The one configuration object that describes a run, saved and loaded as YAML.

The UI form, the CLI (`--config`, `--set`, `--preset`) and the presets all produce a `Config`.
Each field's metadata holds what is allowed and a one-line hint, which the UI shows beside it.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LoraLabError, shown

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def opt(default, hint: str, choices=None, lo=None, hi=None):
    meta = {"hint": hint, "choices": choices, "min": lo, "max": hi}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    base: str = opt("tiny-demo", "Base model: a diffusers folder, a .safetensors checkpoint, a hub id, "
                    "or a built-in tiny model: tiny-demo (the demo), tiny-random / tiny-random-xl "
                    "(random weights, fast tests), tiny-demo-xl.")
    family: str = opt("auto", "Model family; auto detects it from the weights.",
                      choices=["auto", "sd15", "sd2", "sdxl"])
    prediction_type: str = opt("auto", "What the model predicts; auto reads it from the model "
                               "(SD 2.x 768 models use v_prediction).",
                               choices=["auto", "epsilon", "v_prediction"])
    config_dir: str = opt("", "Diffusers config folder for a single-file checkpoint of an unusual shape; "
                          "empty uses the shipped SD 1.x / 2.x / XL configs.")
    allow_pickle: bool = opt(False, "Allow .ckpt/.pt/.bin pickle checkpoints, which can run code "
                             "when loaded. Only for files you trust.")
    weight_dtype: str = opt("auto", "Format the frozen base weights are stored in while training; they are computed "
                            "in the training precision, one layer at a time. fp8 halves the UNet's memory (SDXL: "
                            "4.8 → 2.4 GB) at a small cost in likeness; auto stores them in the training precision. "
                            "The LoRA file is the same either way.",
                            choices=["auto", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2"])


@dataclass
class DatasetConfig:
    source: str = opt("", "A local folder, a saved Hugging Face dataset, a parquet file, or a hub id.")
    split: str = opt("train", "Split of a Hugging Face dataset.")
    image_column: str = opt("image", "Image column of a Hugging Face dataset.")
    caption_column: str = opt("text", "Caption column of a Hugging Face dataset.")
    resolution: int = opt(512, "Training resolution in pixels (the side of a square of the same area).",
                          lo=64, hi=4096)
    resize: str = opt("crop", "How images are fitted to the resolution when bucketing is off.",
                      choices=["none", "stretch", "crop", "pad"])
    bucketing: bool = opt(True, "Group images by aspect ratio so nothing is cropped away.")
    bucket_min_side: int = opt(256, "Smallest bucket side in pixels.", lo=16, hi=4096)
    bucket_max_side: int = opt(1024, "Largest bucket side in pixels.", lo=16, hi=8192)
    bucket_step: int = opt(64, "Bucket sides are multiples of this.", lo=8, hi=512)
    repeats: int = opt(1, "How often each image is seen per epoch (kohya N_name folders multiply it).",
                       lo=1, hi=10000)
    caption_prefix: str = opt("", "Put first in every caption, e.g. your trigger word.")
    caption_extension: str = opt(".txt", "Sidecar caption file extension.", choices=[".txt", ".caption"])
    caption_dropout: float = opt(0.0, "Chance of training a step with an empty caption.", lo=0.0, hi=1.0)
    shuffle_tags: bool = opt(False, "Shuffle comma-separated tags each step.")
    keep_tokens: int = opt(0, "With shuffling, keep this many leading tags in place.", lo=0, hi=1000)
    flip: bool = opt(False, "Randomly mirror images horizontally (not for asymmetric subjects).")
    cache_latents: bool = opt(True, "Encode images once and keep the latents on disk.")
    cache_text_embeddings: bool = opt(True, "Encode captions once when the text encoder is frozen.")


@dataclass
class NetworkConfig:
    algorithm: str = opt("lora", "Adapter type. OFT files hold whole weight changes: about 190 MB for SD 1.5 "
                         "attention layers, 1.7 GB for all layers.", choices=["lora", "dora", "loha", "lokr", "oft"])
    rank: int = opt(16, "Adapter rank (dim): capacity and file size. 4-32 is usual.", lo=1, hi=1024)
    alpha: float = opt(16.0, "Scales the adapter by alpha/rank; lower is gentler.", lo=0.0, hi=4096.0)
    dropout: float = opt(0.0, "Dropout inside the adapter.", lo=0.0, hi=0.9)
    targets: str = opt("attention", "Which layers get an adapter.",
                       choices=["attention", "attention_ff", "all"])
    train_text_encoder: bool = opt(False, "Also train the text encoder(s).")
    text_encoder_lr: float = opt(0.0, "Text encoder learning rate; 0 uses the main one.", lo=0.0, hi=1.0)
    init_from: str = opt("", "Continue from this LoRA file: its weights load and its step count carries on.")
    init_weights: str = opt("gaussian", "How a new LoRA or DoRA starts: gaussian as diffusers' scripts, or kaiming as "
                            "kohya sd-scripts (smaller: the same learning rate trains it more slowly; use it with "
                            "learning rates from sd-scripts).", choices=["gaussian", "kaiming"])


@dataclass
class TrainConfig:
    steps: int = opt(1000, "Optimizer steps to train.", lo=1, hi=10_000_000)
    batch_size: int = opt(1, "Images per step.", lo=1, hi=1024)
    gradient_accumulation: int = opt(1, "Micro-batches per optimizer step.", lo=1, hi=1024)
    learning_rate: float = opt(1e-4, "Learning rate (Prodigy: use 1.0).", lo=0.0, hi=10.0)
    optimizer: str = opt("adamw", "Optimizer.",
                         choices=["adamw", "adamw8bit", "adam", "sgd", "rmsprop", "adafactor", "prodigy"])
    weight_decay: float = opt(0.01, "Weight decay.", lo=0.0, hi=1.0)
    lr_scheduler: str = opt("constant", "How the learning rate changes over the run.",
                            choices=["constant", "constant_with_warmup", "linear", "cosine"])
    warmup_steps: int = opt(0, "Steps of learning-rate warmup.", lo=0, hi=10_000_000)
    loss: str = opt("mse", "Loss function.", choices=["mse", "l1", "huber", "smooth_l1"])
    huber_delta: float = opt(0.1, "Delta of the Huber / smooth L1 losses.", lo=1e-6, hi=100.0)
    min_snr_gamma: float = opt(0.0, "Min-SNR weighting gamma (5 is usual); 0 turns it off.", lo=0.0, hi=100.0)
    noise_offset: float = opt(0.0, "Noise offset for darker darks and brighter brights (0.05 is usual).",
                              lo=0.0, hi=1.0)
    mixed_precision: str = opt("auto", "Number format of the frozen weights and the maths: auto picks bf16 on "
                               "RTX 30xx and newer, fp16 on RTX 20xx/V100/T4, fp32 on older cards and the CPU.",
                               choices=["auto", "bf16", "fp16", "fp32"])
    gradient_checkpointing: bool = opt(False, "Recompute activations to save memory (slower).")
    checkpoint_depth: str = opt("block", "How fine gradient checkpointing is: block (each ResNet and transformer "
                                "block, as diffusers does) or layer (each attention and feed-forward on its own: a "
                                "lower peak while one is recomputed, but the outputs of the norms between them are "
                                "kept: +0.1 GB for SD 1.5 at 512 px, +1.0 GB for SDXL at 1024 px; block is leaner).",
                                choices=["block", "layer"])
    offload: str = opt("text_encoders", "What waits in CPU memory while training: none; text_encoders (after "
                       "caching their embeddings); blocks (also the UNet's blocks, each copied to the GPU just "
                       "before it runs while the next one is copied; turns on gradient checkpointing).",
                       choices=["none", "text_encoders", "blocks"])
    offload_blocks: int = opt(0, "With offload=blocks: how many of the UNet's blocks stay on the GPU (more is "
                              "faster and needs more memory).", lo=0, hi=10_000)
    ema: bool = opt(False, "Also keep an exponential moving average of the adapter weights, exported as "
                    "<name>-ema.safetensors: often smoother results from a noisy run.")
    ema_decay: float = opt(0.999, "Highest EMA decay: update n uses min(n / (n + 9), this), so the average covers "
                                  "about the last n / 9 updates until it is reached (0.999: after ~9,000 updates).",
                           lo=0.0, hi=0.999999)
    ema_every: int = opt(1, "Update the EMA every N steps.", lo=1, hi=1_000_000)
    ema_on_cpu: bool = opt(False, "Keep the EMA weights in CPU memory (saves GPU memory, costs a copy per update).")
    compile: str = opt("auto", "torch.compile the UNet (CUDA GPUs only): an SD 1.5 step ran 45 % faster on an H200 after "
                       "a first step of about 2 minutes, which pays back after about 2,000 steps. auto: on for runs of "
                       "that many steps; on; off. (Was true/false: those still mean on/off.)",
                       choices=["auto", "on", "off"])
    channels_last: bool = opt(False, "Channels-last memory layout for the UNet (can be faster on GPUs).")
    fused_lora: bool = opt(True, "Compute the UNet's LoRA attention projections together (q, k, v in one matmul, all "
                           "weights cast at once): the same adapter in far fewer GPU launches per step. Plain LoRA "
                           "without dropout; off: peft's layer-by-layer path.")
    fast_norms: bool = opt(True, "Under bf16, run the UNet's GroupNorm/LayerNorm in bf16 (statistics in fp32) "
                           "instead of casting their inputs and outputs to fp32 and back around each: fewer GPU "
                           "launches, a rounding that the next layer makes anyway. Off: autocast's fp32 norms.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 turns clipping off.", lo=0.0, hi=1e6)
    seed: int = opt(42, "Random seed; the same seed repeats a CPU run exactly.", lo=0, hi=2**31 - 1)
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, mps.")


@dataclass
class SaveConfig:
    every_n_steps: int = opt(500, "Save a resumable checkpoint every N steps; 0 saves only at the end.",
                             lo=0, hi=10_000_000)
    keep_last: int = opt(3, "Checkpoints to keep.", lo=1, hi=1000)
    precision: str = opt("fp16", "Number format of the exported LoRA file.", choices=["fp16", "bf16", "fp32"])


@dataclass
class SampleConfig:
    every_n_steps: int = opt(0, "Make sample images every N steps; 0 only at the end (if prompts are set).",
                             lo=0, hi=10_000_000)
    prompts: list = opt([], "Prompts for sample images.")
    negative_prompt: str = opt("", "Negative prompt for samples.")
    seed: int = opt(1234, "Seed of sample images, so they are comparable across steps.", lo=0, hi=2**31 - 1)
    steps: int = opt(20, "Denoising steps per sample.", lo=1, hi=200)
    guidance_scale: float = opt(7.0, "Classifier-free guidance scale.", lo=0.0, hi=50.0)
    width: int = opt(0, "Sample width; 0 uses the training resolution.", lo=0, hi=4096)
    height: int = opt(0, "Sample height; 0 uses the training resolution.", lo=0, hi=4096)
    scheduler: str = opt("euler_a", "Sampler.", choices=["euler_a", "euler", "ddim", "dpmpp_2m"])
    score_model: str = opt("", "A CLIP model (local folder, or hub id while online) to score each sample for "
                               "likeness to the training images, prompt following and near-copies; empty: no scores.")


@dataclass
class ValidationConfig:
    enabled: bool = opt(True, "Measure a validation loss while training: fixed noise at fixed timesteps, so two "
                              "measurements differ only by the weights. The step with the lowest is the best.")
    share: float = opt(0.1, "Share of the images held out of training to measure on (at least 1), when the "
                            "dataset has validation.min_images or more; 0 holds none out.", lo=0.0, hi=0.5)
    min_images: int = opt(10, "Hold images out only from this many on; with fewer every image is trained on and "
                              "the loss is measured on the training images (and labelled so).", lo=2, hi=1_000_000)
    source: str = opt("", "A folder (or Hugging Face dataset) of validation images of its own; empty holds out "
                          "a share of the training images.")
    every_n_steps: int = opt(0, "Measure every N steps; 0 measures at each checkpoint (save.every_n_steps), or "
                                "10 times a run when checkpoints are off.", lo=0, hi=10_000_000)
    timesteps: int = opt(4, "Timesteps each image is measured at, spread evenly over the noise schedule.",
                         lo=1, hi=100)
    patience: int = opt(0, "Stop early after this many measurements without a new lowest loss (the run ends "
                           "completed, with its best LoRA kept); 0 never stops early.", lo=0, hi=100_000)
    keep_best: bool = opt(True, "Write the LoRA of the step with the lowest validation loss as "
                                "<name>-best.safetensors when that is not the last step.")


@dataclass
class Config:
    name: str = opt("lora", "Run name; also the name of the LoRA file.")
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def write(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        from .runs import removed_on_failure

        with removed_on_failure(path.parent, tmp):
            tmp.write_text(self.to_yaml(), encoding="utf-8")
            tmp.replace(path)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "name"}
_SECTION_CLASSES = {"model": ModelConfig, "dataset": DatasetConfig, "network": NetworkConfig,
                    "train": TrainConfig, "save": SaveConfig, "sample": SampleConfig,
                    "validation": ValidationConfig}


def _got(value) -> str:
    return "nothing (the box is empty)" if value is None or value == "" else shown(value)


def field_specs(section: str) -> list[dataclasses.Field]:
    """The fields of one section, for forms and documentation."""
    return list(dataclasses.fields(_SECTION_CLASSES[section]))


# train.compile was true/false until it got `auto`; run folders and presets of before still load.
RENAMED_VALUES = {"train.compile": {True: "on", False: "off", "true": "on", "false": "off", "yes": "on", "no": "off"}}


def _coerce(key: str, f: dataclasses.Field, value: Any):
    kind = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float,
                                                    "bool": bool, "list": list}[f.type]
    meta = f.metadata
    if key in RENAMED_VALUES:  # a key that took other values once: the old ones still mean what they meant
        value = RENAMED_VALUES[key].get(value.lower() if isinstance(value, str) else value, value)
    if kind is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            out = value.lower() in ("true", "yes", "on", "1")
        else:
            raise LoraLabError(f"{key}: expected true or false, got {shown(value)}.")
    elif kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise LoraLabError(f"{key}: expected a whole number, got {_got(value)}.")
        out = int(value)
    elif kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LoraLabError(f"{key}: expected a number, got {_got(value)}.")
        out = float(value)
        if out != out or out in (float("inf"), float("-inf")):
            raise LoraLabError(f"{key}: expected a finite number, got {shown(value)}.")
    elif kind is list:
        if isinstance(value, str):
            value = [line for line in value.splitlines() if line.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise LoraLabError(f"{key}: expected a list of text lines, got {shown(value)}.")
        out = list(value)
    else:
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise LoraLabError(f"{key}: expected text, got {shown(value)}.")
        out = str(value)
    choices = meta.get("choices")
    if choices and out not in choices:
        raise LoraLabError(f"{key}: {shown(out)} is not allowed.", f"Use one of: {', '.join(map(str, choices))}.")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and out < lo or hi is not None and out > hi:
        raise LoraLabError(f"{key}: {shown(out)} is out of range.", f"Allowed: {lo} to {hi}.")
    return out


def _unknown(key, known: list[str]) -> LoraLabError:
    key = shown(key)
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f"Did you mean '{close[0]}'?" if close else f"Known keys: {', '.join(known)}."
    return LoraLabError(f"Unknown config key '{key}'.", hint)


def config_from_dict(data: dict | None) -> Config:
    """Build a validated Config from nested plain data; unknown keys and bad values are refused."""
    if not isinstance(data or {}, dict):
        raise LoraLabError(f"A config must be a mapping of sections to settings, got {shown(data)}.",
                           "Write it as in config.yaml: 'train:' on one line, '  steps: 500' under it.")
    data = dict(data or {})
    data.pop("description", None)  # presets carry one for the UI
    cfg = Config()
    top = ["name", *SECTIONS]
    for key, value in data.items():
        if key == "name":
            cfg.name = _coerce("name", dataclasses.fields(Config)[0], value)
            continue
        if key not in SECTIONS:
            raise _unknown(key, top)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise LoraLabError(f"'{key}' must be a section of settings, got {shown(value)}.")
        section = getattr(cfg, key)
        fields = {f.name: f for f in dataclasses.fields(section)}
        for sub, v in value.items():
            if sub not in fields:
                raise _unknown(f"{key}.{sub}", list(fields))
            setattr(section, sub, _coerce(f"{key}.{sub}", fields[sub], v))
    return cfg


def merge(base: dict, over: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_set(items: list[str]) -> dict:
    """`--set section.key=value` items → nested dict; values are read as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise LoraLabError(f"--set {shown(item)} has no '='.", "Write it as section.key=value, e.g. train.steps=500.")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw, "--set value") if raw.strip() else ""
        except LoraLabError:
            value = raw
        parts = key.strip().split(".")
        if parts == ["name"]:
            out["name"] = str(value)
        elif len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise LoraLabError(f"--set key {shown(key)} is not section.key.", "For example: train.learning_rate=1e-4.")
    return out


MAX_YAML = 256 * 1024  # characters: a config is a few kB


def parse_yaml(text: str, what: str = "The config"):
    """Plain YAML data from untrusted text: bounded in size, with no anchors or aliases.

    safe_load already refuses `!!python` tags; aliases are refused before anything is built, because
    a few hundred bytes of nested aliases stand for gigabytes once anything walks the data.
    """
    if len(text) > MAX_YAML:
        raise LoraLabError(f"{what} is {len(text):,} characters long.", f"A config is at most {MAX_YAML:,}.")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise LoraLabError(f"{what} uses YAML anchors or aliases (& and *).",
                                   "Write each value out in full.")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LoraLabError(f"{what} is not valid YAML: {shown(str(e), 300)}", "Fix it and try again.")


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LoraLabError(f"Config file {path} does not exist.", "Check the path.")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), f"Config file {path}") or {}
    except UnicodeDecodeError:
        raise LoraLabError(f"Config file {path} is not UTF-8 text.", "Save it as UTF-8 and try again.")
    if not isinstance(data, dict):
        raise LoraLabError(f"Config file {path} must hold a mapping of sections.")
    return data


def _preset_files(own_dir: Path | None = None) -> dict[str, Path]:
    """Preset name → file: the shipped ones, then a user's own (`<workspace>/presets`), which never
    shadow a shipped name."""
    files = {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}
    if own_dir and Path(own_dir).is_dir():
        for p in sorted(Path(own_dir).glob("*.yaml")):
            files.setdefault(p.stem, p)
    return files


def list_presets(own_dir: Path | None = None) -> dict[str, str]:
    """Preset name → its description (shipped presets first, then the user's own)."""
    out = {}
    for name, p in _preset_files(own_dir).items():
        try:
            out[name] = str(read_yaml(p).get("description", ""))
        except (LoraLabError, OSError):
            continue  # a damaged file of one's own is not listed; the shipped ones always read
    return out


def preset_dict(name: str, own_dir: Path | None = None) -> dict:
    files = _preset_files(own_dir)
    if not isinstance(name, str) or name not in files:
        raise LoraLabError(f"Unknown preset '{shown(name)}'.", f"Available: {', '.join(files) or 'none'}.")
    return read_yaml(files[name])


# What a preset of one's own leaves out: which run and which data it was, not how to train.
PRESET_SKIPS = {"name": None, "dataset": ("source", "split", "image_column", "caption_column")}


def save_preset(cfg: Config, own_dir: Path, name: str, description: str = "") -> Path:
    """Write `cfg`'s settings as a preset of one's own, `<own_dir>/<name>.yaml`."""
    name = (name or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}", name) or name.endswith("."):
        raise LoraLabError(f"'{shown(name)}' cannot be a preset name.",
                           "Use up to 64 letters, digits, spaces, '-', '_' or '.'.")
    if (PRESETS_DIR / f"{name}.yaml").exists():
        raise LoraLabError(f"'{name}' is a preset that comes with LoRA Lab.", "Pick another name for yours.")
    data = cfg.to_dict()
    for key, sub in PRESET_SKIPS.items():
        if sub is None:
            data.pop(key, None)
        else:
            for k in sub:
                data.get(key, {}).pop(k, None)
    data = {"description": description.strip() or f"My settings: {cfg.model.base}, {cfg.network.algorithm} "
                                                  f"rank {cfg.network.rank}, {cfg.train.steps} steps.", **data}
    own_dir = Path(own_dir)
    own_dir.mkdir(parents=True, exist_ok=True)
    path = own_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def resolve(preset: str | None = None, file: Path | None = None, sets: list[str] | None = None,
            extra: dict | None = None, own_presets: Path | None = None) -> Config:
    """Preset, then config file, then explicit values, then `--set` items, each over the last."""
    data: dict = {}
    if preset:
        data = merge(data, preset_dict(preset, own_presets))
    if file:
        data = merge(data, read_yaml(file))
    if extra:
        data = merge(data, extra)
    data = merge(data, parse_set(sets or []))
    return config_from_dict(data)


def load(path: Path) -> Config:
    return config_from_dict(read_yaml(path))


