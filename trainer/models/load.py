"""Load a base model from a diffusers folder, a single-file checkpoint, a hub id or a tiny demo id.

Everything ends as a `BaseModel`: the components a LoRA trainer needs, the detected family
(sd15, sd2, sdxl) and prediction type, and a fingerprint that keys the latent cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraLabError
from .detect import PICKLE_SUFFIXES, detect_single_file_family
from .tiny import DEMO_DIR, TINY_IDS, XL_IDS, build_tiny

CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass
class BaseModel:
    family: str
    prediction_type: str
    unet: object
    vae: object
    text_encoders: list
    tokenizers: list
    scheduler: object  # the sampling scheduler the model ships with
    fingerprint: str
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def is_xl(self) -> bool:
        return self.family == "sdxl"

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        """The size the model was trained at: its UNet's sample size in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale

    def noise_scheduler(self):
        """The DDPM schedule the model was trained with, for adding noise during training."""
        from diffusers import DDPMScheduler

        cfg = dict(self.scheduler.config)
        keep = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"}
        return DDPMScheduler(**{k: v for k, v in cfg.items() if k in keep},
                             prediction_type=self.prediction_type, clip_sample=False)


def _family_from_folder(folder: Path) -> str:
    index = json.loads((folder / "model_index.json").read_text())
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        return "sdxl"
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    return "sd2" if unet_cfg.get("cross_attention_dim") == 1024 else "sd15"


def _fingerprint(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return _fingerprint(path.resolve(), st.st_size, int(st.st_mtime))


def config_folder(family: str) -> Path:
    """A complete offline config folder for `family`: the shipped configs plus the CLIP tokenizer files.

    The tokenizer files are shipped once and copied into each family's folder in the user cache, so
    `from_single_file` never has to ask the hub for a config.
    """
    src = CONFIGS / family
    cache = Path(os.environ.get("LORA_LAB_CACHE", Path.home() / ".cache" / "lora-lab")) / "configs" / family
    stamp = cache / ".complete"
    if not stamp.exists():
        if cache.exists():
            shutil.rmtree(cache)
        shutil.copytree(src, cache)
        for tok in cache.glob("tokenizer*"):
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(CONFIGS / "clip_tokenizer" / name, tok / name)
        stamp.write_text("ok")
    return cache


def _components_from_pipe(pipe) -> dict:
    parts = {"unet": pipe.unet, "vae": pipe.vae, "scheduler": pipe.scheduler,
             "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    return parts


def _load_folder(folder: Path, family: str) -> dict:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise LoraLabError(f"{folder} looks like a diffusers folder but could not be loaded: {e}",
                           "Check that unet/, vae/, text_encoder/ and tokenizer/ are complete.")
    return _components_from_pipe(pipe)


def _load_single_file(path: Path, family: str, prediction_type: str, config_dir: str = "") -> dict:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(str(path), config=str(config_dir or config_folder(family)), local_files_only=True,
                                    **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LoraLabError(f"{path.name} could not be loaded as a {family} checkpoint: {e}",
                           "If the family was guessed wrong, set model.family; otherwise the file may be damaged.")
    if prediction_type != "auto":
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    return _components_from_pipe(pipe)


def _load_hub(repo_id: str) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from ..hub_cache import require

    require(repo_id, "model", "Download the model on a connected machine and give its folder or .safetensors file "
            "instead, or connect to the internet once.")
    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                                   ignore_patterns=["*.fp16.*", "*ema*", "*/diffusion_pytorch_model.non_ema*"])
    except RepositoryNotFoundError:
        raise LoraLabError(f"There is no model '{repo_id}' on the Hugging Face hub.",
                           "Check the id (owner/name), or log in if it is private or gated.")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise LoraLabError(f"Could not download '{repo_id}' from the Hugging Face hub ({type(e).__name__}).",
                           "You seem to be offline: download the model on a connected machine and give "
                           "its folder or .safetensors file instead.")
    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise LoraLabError(f"'{repo_id}' is not a diffusers Stable Diffusion model (no model_index.json).",
                           "Use a diffusers repository or a .safetensors checkpoint file.")
    return folder, _fingerprint("hub", repo_id, folder.name)


def load_base(spec: str, family: str = "auto", prediction_type: str = "auto",
              allow_pickle: bool = False, config_dir: str = "") -> BaseModel:
    """Load `spec` (see module doc). Raises LoraLabError with advice for anything a user can fix."""
    import torch

    spec = (spec or "").strip()
    if not spec:
        raise LoraLabError("No base model given.", "Set model.base to a model folder, a .safetensors file, "
                           "a hub id, or tiny-demo.")
    path = Path(spec).expanduser()
    if spec == "tiny-demo" and (DEMO_DIR / "model_index.json").exists():  # a trained one, once built there
        parts = _load_folder(DEMO_DIR, "sd15")
        detected, fp = "sd15", _fingerprint(DEMO_DIR, (DEMO_DIR / "unet").stat().st_mtime)
    elif spec in TINY_IDS:
        parts = build_tiny(spec)
        detected, fp = ("sdxl" if spec in XL_IDS else "sd15"), _fingerprint(spec, "v1")
    elif path.is_dir():
        if not (path / "model_index.json").exists():
            raise LoraLabError(f"{path} is a folder but not a diffusers model (no model_index.json).",
                               "Pick the model's top folder, or a .safetensors checkpoint file.")
        detected = _family_from_folder(path)
        parts = _load_folder(path, family if family != "auto" else detected)
        fp = _fingerprint(path.resolve(), (path / "unet").stat().st_mtime)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise LoraLabError(
                f"{path.name} is a pickle checkpoint ({suffix}), which can run arbitrary code when loaded.",
                "Convert it to .safetensors, or allow pickle files (model.allow_pickle, or --allow-pickle "
                "at launch) if you trust where it came from.")
        if suffix not in (".safetensors", *PICKLE_SUFFIXES):
            raise LoraLabError(f"{path.name} is not a model checkpoint (expected .safetensors).",
                               "Pick a Stable Diffusion checkpoint file or a diffusers folder.")
        detected, detected_pred = detect_single_file_family(path)
        if prediction_type == "auto" and detected_pred:
            prediction_type = detected_pred
        parts = _load_single_file(path, family if family != "auto" else detected, prediction_type, config_dir)
        fp = _file_fingerprint(path)
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.suffix:
        folder, fp = _load_hub(spec)
        detected = _family_from_folder(folder)
        parts = _load_folder(folder, family if family != "auto" else detected)
    else:
        raise LoraLabError(f"Base model '{spec}' was not found.",
                           "Give an existing folder or .safetensors file, a hub id like owner/name, or tiny-demo.")
    fam = detected if family == "auto" else family
    pred = parts["scheduler"].config.get("prediction_type", "epsilon") if prediction_type == "auto" else prediction_type
    tes = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if "text_encoder_2" in parts else [])
    toks = [parts["tokenizer"]] + ([parts["tokenizer_2"]] if "tokenizer_2" in parts else [])
    if (fam == "sdxl") != (len(tes) == 2):
        raise LoraLabError(f"model.family is {fam}, but the model has {len(tes)} text encoder(s).",
                           "Set model.family to auto.")
    for m in [parts["unet"], parts["vae"], *tes]:
        # diffusers loads an fp16 folder's UNet and VAE as fp32, transformers 5 keeps the text encoder's
        # fp16: every part starts in fp32 here, and the trainer and the generator cast from there.
        torch.nn.Module.to(m, dtype=torch.float32)
        m.requires_grad_(False)
        m.eval()
    return BaseModel(family=fam, prediction_type=pred, unet=parts["unet"], vae=parts["vae"], text_encoders=tes,
                     tokenizers=toks, scheduler=parts["scheduler"], fingerprint=fp, source=spec)
