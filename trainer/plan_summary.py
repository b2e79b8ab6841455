"""Before a run starts: how many steps it is, roughly how much memory it needs, and what looks wrong."""
from __future__ import annotations

import math

from .scores import NEEDS_MODEL
from .validation import plan_line

from .memory_plan import fit_warning, option_warnings, peak_gb, phases

# Weights of the adapted layers (UNet, text encoders) per targets: whole ("full", an OFT file) and per rank
# of a LoRA ("rank1"); from tests/bench/adapter_sizes.py.
ADAPTED = {
    "sd15": {"attention": ((93_511_680, 199_296), (28_311_552, 73_728)),
             "attention_ff": ((266_977_280, 423_936), (84_934_656, 165_888)),
             "all": ((831_201_280, 1_002_496), (84_934_656, 165_888))},
    "sd2": {"attention": ((99_901_440, 207_488), (96_468_992, 188_416)),
            "attention_ff": ((273_367_040, 432_128), (289_406_976, 423_936)),
            "all": ((837_591_040, 1_010_688), (289_406_976, 423_936))},
    "sdxl": {"attention": ((955_187_200, 1_451_520), (238_026_752, 401_408)),
             "attention_ff": ((2_207_744_000, 2_659_840), (714_080_256, 903_168)),
             "all": ((2_540_953_600, 3_038_720), (714_080_256, 903_168))},
}


def estimate_memory_gb(cfg, family: str) -> float:
    """Peak accelerator memory of the run: its largest phase (memory_plan.phases)."""
    return peak_gb(cfg, family)


def card_gb(device: str) -> float | None:
    """Memory of the CUDA card the run would use; None without one."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    try:
        index = torch.device(device).index if device.startswith("cuda") else None
        return torch.cuda.get_device_properties(index or 0).total_memory / 1024**3
    except (RuntimeError, AssertionError):
        return None


def file_mb(cfg, family: str, algorithm: str | None = None) -> float | None:
    """About how big the exported file is (LoKr: not estimated; its factors depend on each layer's shape)."""
    net = cfg.network
    algorithm = algorithm or net.algorithm
    if family not in ADAPTED or algorithm == "lokr":
        return None
    (unet_full, unet_r1), (te_full, te_r1) = ADAPTED[family][net.targets]
    te = net.train_text_encoder
    if algorithm == "oft":
        weights = unet_full + (te_full if te else 0)
    else:
        weights = (unet_r1 + (te_r1 if te else 0)) * net.rank * (2 if algorithm == "loha" else 1)
    return round(weights * (4 if cfg.save.precision == "fp32" else 2) / 1e6, 1)


def init_warnings(cfg) -> list[str]:
    n = cfg.network
    if n.init_weights == "gaussian" or n.algorithm in ("lora", "dora"):
        return []
    return [f"network.init_weights={n.init_weights} is not used with network.algorithm={n.algorithm}: it sets how "
            "a LoRA or DoRA starts; LoHa, LoKr and OFT start their own way."]


def oft_warnings(cfg, family: str) -> list[str]:
    if cfg.network.algorithm != "oft":
        return []
    size, lora = file_mb(cfg, family), file_mb(cfg, family, "lora")
    what = f"about {size:,.0f} MB here, against {lora:,.0f} MB for a LoRA of rank {cfg.network.rank}" if size else \
        "as big as the adapted layers themselves"
    return [f"OFT files hold each adapted layer's whole weight change ({what}): peft's OFT rotates each layer's "
            "input, which no compact layout that ComfyUI or AUTOMATIC1111 read can express."]


def demo_model_warnings(cfg) -> list[str]:
    """The tiny demo models learn and draw at 64 px, in a minute; settings made for a real model (a class
    preset left on the demo model) train slowly and show little."""
    if not cfg.model.base.startswith("tiny-demo") or cfg.dataset.resolution <= 128:
        return []
    return [f"{cfg.model.base} is a tiny demo model that draws 64×64 pictures: at resolution {cfg.dataset.resolution} "
            "it trains slowly and shows little. Pick the base model you mean to train, or the cpu-demo preset for "
            "the demo model's own settings (64 px, learning rate 3e-3)."]


def family_guess(base: str) -> str:
    b = base.lower()
    if b.startswith(("tiny-demo", "tiny-random")):
        return "tiny"
    if "xl" in b:
        return "sdxl"
    if "v2" in b or "2-1" in b or "2.1" in b:
        return "sd2"
    return "sd15"


def shared_first_tag(captions: list[str], share: float = 0.8) -> str:
    """The first comma-separated tag that most captions start with (a trigger word written into them), or ''."""
    firsts = [c.split(",")[0].strip() for c in captions if c.strip()]
    if not firsts:
        return ""
    top = max(set(firsts), key=firsts.count)
    return top if firsts.count(top) >= share * len(firsts) and len(top.split()) <= 3 else ""


def interval_warnings(cfg) -> list[str]:
    steps, out = cfg.train.steps, []
    if cfg.save.every_n_steps > steps:
        out.append(f"Checkpoints every {cfg.save.every_n_steps} steps, but the run has {steps}: only the final "
                   "LoRA is saved (nothing to resume from or compare). Lower save.every_n_steps.")
    if cfg.sample.prompts and cfg.sample.every_n_steps > steps:
        out.append(f"Samples every {cfg.sample.every_n_steps} steps, but the run has {steps}: samples only at "
                   "the end. Lower sample.every_n_steps.")
    return out


# Seconds for one UNet evaluation (batch 2: the prompt and the negative, for guidance) at 512², on 2
# CPU cores in fp32, from tests/bench/bench_sample_time.py; a sample step is one evaluation.
CPU_UNET_S = {"sd15": 4.0, "sd2": 4.5, "sdxl": 14.0, "tiny": 0.02}


def sampling_plan(cfg, family: str, on_cpu: bool) -> dict | None:
    """What sample images cost during the run: how many, how often, and each round's time in training
    steps (a sample step is one UNet evaluation; a training step about three, forward and backward,
    per image of the batch). On a CPU also in minutes, where a full-size model's sample image takes
    minutes (what made a classroom run look frozen)."""
    s, t = cfg.sample, cfg.train
    if not s.prompts:
        return None
    res = cfg.dataset.resolution
    w, h = s.width or res, s.height or res
    rounds = (t.steps // s.every_n_steps if s.every_n_steps else 0)
    rounds += 0 if s.every_n_steps and t.steps % s.every_n_steps == 0 else 1  # the one at the end
    per_image = s.steps * (w * h) / (3 * t.batch_size * res * res)
    out = {"images": len(s.prompts), "rounds": rounds, "steps": s.steps, "size": f"{w}×{h}",
           "round_in_steps": math.ceil(per_image * len(s.prompts)),
           "share": round(per_image * len(s.prompts) * rounds / max(1, t.steps * t.gradient_accumulation), 2)}
    if on_cpu:
        fam = family if family in CPU_UNET_S else "sd15"
        seconds = CPU_UNET_S[fam] * (w * h) / 512**2 * s.steps * len(s.prompts)
        out["round_minutes_cpu"] = round(seconds / 60, 1)
    return out


def sampling_warnings(sp: dict | None) -> list[str]:
    if not sp:
        return []
    out = []
    if sp.get("round_minutes_cpu", 0) >= 2:
        out.append(f"On this computer's CPU each round of samples takes about {sp['round_minutes_cpu']:g} minutes "
                   f"({sp['images']} images × {sp['steps']} steps at {sp['size']}). Fewer prompts, fewer "
                   "sample.steps, a smaller sample.width/height or a longer sample.every_n_steps make it shorter; "
                   "Stop works during sampling too.")
    if sp["share"] >= 0.5:
        out.append(f"Sample images take about {sp['share']:.0%} as long as the training itself; raise "
                   "sample.every_n_steps or lower sample.steps if that is more than you want.")
    return out


def plan(cfg, dataset_summary: dict | None, on_cpu: bool | None = None, card: float | None = None) -> dict:
    """steps, epochs, memory and warnings for the summary shown before Start; `card`: the GPU's memory in GB
    (default: the CUDA card's, when there is one), which the estimate is checked against."""
    t, d = cfg.train, cfg.dataset
    warnings = []
    per_epoch = None
    if dataset_summary:
        images, repeats = dataset_summary["images"], dataset_summary["repeats"]
        per_epoch = math.ceil(repeats / t.batch_size / t.gradient_accumulation)
        if images < 5:
            warnings.append(f"Only {images} images: 10–30 varied images usually give a better LoRA.")
        prefix = d.caption_prefix.strip()
        captions = dataset_summary.get("captions") or []
        if prefix and captions:
            missing = sum(1 for c in captions if prefix not in c)
            if missing:
                warnings.append(f"The trigger word '{prefix}' is missing from {missing} captions; "
                                "it is added in front during training.")
        trigger = prefix or shared_first_tag(captions)
        if not trigger:
            warnings.append("No trigger word (caption prefix, or a first tag all captions share): the LoRA will "
                            "apply without one.")
        elif cfg.sample.prompts:
            off = [p for p in cfg.sample.prompts if trigger.lower() not in p.lower()]
            if off:
                warnings.append(f"{len(off)} of {len(cfg.sample.prompts)} sample prompts lack the trigger word "
                                f"'{trigger}' (e.g. '{off[0][:60]}'): their samples will not show what the LoRA "
                                "learned under it.")
        sides = [int(s.split("x")[0]) * int(s.split("x")[1]) for s, _ in dataset_summary["sizes"]]
        if sides and max(sides) < d.resolution ** 2:
            warnings.append(f"Resolution {d.resolution} is above every image's size; images are not upscaled, "
                            "so a lower resolution trains faster for the same result.")
        if dataset_summary["missing_captions"]:
            warnings.append(f"{dataset_summary['missing_captions']} images have no caption.")
    warnings += interval_warnings(cfg)
    warnings += demo_model_warnings(cfg)
    family = family_guess(cfg.model.base)
    if on_cpu is None:
        on_cpu = _no_accelerator(cfg.train.device)
    sp = sampling_plan(cfg, family, on_cpu)
    warnings += sampling_warnings(sp)
    warnings += oft_warnings(cfg, family)
    warnings += init_warnings(cfg)
    warnings += option_warnings(cfg, on_cpu)
    card = card if card is not None else (None if on_cpu else card_gb(cfg.train.device))
    fit = fit_warning(cfg, family, card) if card else None
    if fit:
        warnings.insert(0, fit)
    return {
        "steps": t.steps,
        "steps_per_epoch": per_epoch,
        "epochs": round(t.steps / per_epoch, 1) if per_epoch else None,
        "memory_gb": estimate_memory_gb(cfg, family),
        "memory_phases": phases(cfg, family),
        "card_gb": card,
        "on_cpu": on_cpu,
        "warnings": warnings,
        "sampling": sp,
        "file_mb": file_mb(cfg, family),
        "validation": plan_line(cfg, dataset_summary["images"] if dataset_summary else None),
        "scores": (None if not cfg.sample.prompts else
                   f"Sample scores (likeness, prompt following, near-copies) with {cfg.sample.score_model}."
                   if cfg.sample.score_model else f"Sample scores: off. {NEEDS_MODEL}"),
    }


def _no_accelerator(device: str) -> bool:
    if device == "cpu":
        return True
    import torch

    mps = getattr(torch.backends, "mps", None)
    return device == "auto" and not torch.cuda.is_available() and not (mps and mps.is_available())


def describe(p: dict, dataset_summary: dict | None) -> str:
    lines = []
    if dataset_summary:
        lines.append(f"**{dataset_summary['images']} images × repeats = {dataset_summary['repeats']} per epoch → "
                     f"{p['steps_per_epoch']} steps per epoch; {p['steps']} steps ≈ {p['epochs']} epochs.**")
    else:
        lines.append(f"**{p['steps']} steps.** Load a dataset to see epochs.")
    by_phase = ", ".join(f"{k} {v:.1f}" for k, v in (p.get("memory_phases") or {}).items())
    what = ("Estimated GPU memory, were it trained on a GPU (this machine trains on its CPU)" if p.get("on_cpu")
            else "Estimated accelerator memory")
    lines.append(f"{what}: about {p['memory_gb']} GB" + (f" (GB by phase: {by_phase})" if by_phase else "")
                 + (f" of this card's {p['card_gb']:.1f} GB" if p.get("card_gb") else "") + "."
                 + (f" LoRA file: about {p['file_mb']:g} MB." if p.get("file_mb") else ""))
    sp = p.get("sampling")
    if sp:
        when = f"{sp['rounds']} times" if sp["rounds"] > 1 else "once, at the end"
        minutes = sp.get("round_minutes_cpu")
        took = "" if minutes is None else (f", about {minutes:g} min on this CPU" if minutes >= 1 else
                                           ", under a minute on this CPU")
        many = "image" if sp["images"] == 1 else "images"
        lines.append(f"Samples: {sp['images']} {many} × {sp['steps']} steps at {sp['size']}, {when}; each round "
                     f"takes about as long as {sp['round_in_steps']} training steps{took}.")
    for key in ("scores", "validation"):
        if p.get(key):
            lines.append(p[key])
    lines += [f"⚠️ {w}" for w in p["warnings"]]
    return "\n\n".join(lines)
