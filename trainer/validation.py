"""Validation loss: a number that changes only when the weights do.

Images held out of training (a share of the dataset, or a folder of their own; with too few images
the training images themselves, labelled so) are noised at fixed timesteps spread over the schedule
with noise drawn once per image and timestep. The timestep and noise of a training step are random,
which is why a training loss curve is mostly noise; SimpleTuner found (its issue #1304) that a
validation loss is only useful when both are fixed. The loss is plain MSE against the training
target, whatever train.loss is, so runs with different settings compare.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

HELD_OUT, OWN_FOLDER, TRAINING = "held-out images", "validation folder", "training images"


def hold_out(count: int, vcfg, seed: int) -> list[int]:
    """Positions of the images to hold out of training, chosen by seed; none below min_images."""
    if not vcfg.enabled or vcfg.source or not vcfg.share or count < vcfg.min_images:
        return []
    k = min(count - 1, max(1, round(count * vcfg.share)))
    return sorted(random.Random(seed).sample(range(count), k))


def fixed_timesteps(count: int, schedule_length: int) -> list[int]:
    """`count` timesteps at the middles of equal parts of the schedule: 4 of 1000 → 125, 375, 625, 875."""
    return [int((i + 0.5) * schedule_length / count) for i in range(count)]


def every(vcfg, save_every: int, steps: int) -> int:
    """Steps between measurements: validation.every_n_steps, else each checkpoint, else a tenth of the run."""
    return vcfg.every_n_steps or save_every or max(1, math.ceil(steps / 10))


def plan_line(cfg, images: int | None) -> str | None:
    """What Check settings says about the validation loss before a run starts."""
    v = cfg.validation
    if not v.enabled:
        return None
    interval = every(v, cfg.save.every_n_steps, cfg.train.steps)
    if v.source:
        what = "on the images of validation.source"
    elif images is None:
        what = f"on {v.share:.0%} of the images held out (from {v.min_images} images on)"
    elif held := len(hold_out(images, v, 0)):
        what = f"on {held} of the {images} images, held out of training"
    else:
        what = (f"on the {images} training images (fewer than validation.min_images = {v.min_images}, so none "
                "is held out: watch its trend)")
    stop = f"; stops after {v.patience} measurements without a new lowest" if v.patience else ""
    best = f"; the lowest step's LoRA is kept as {cfg.name}-best.safetensors" if v.keep_best else ""
    return f"Validation loss {what}, {v.timesteps} fixed timesteps each, every {interval} steps{best}{stop}."


@dataclass
class Measurement:
    step: int
    loss: float


class Validator:
    """Measures the loss of one set of cached latents at fixed noise and timesteps."""

    def __init__(self, examples, latents, text, model, timesteps: int, seed: int, label: str):
        import torch

        from .encode import sdxl_time_ids, vae_shift_scale
        self.examples, self.latents, self.text, self.model, self.label = examples, latents, text, model, label
        sched = model.noise_scheduler()
        self.sched = sched
        self.t = torch.tensor(fixed_timesteps(timesteps, sched.config.num_train_timesteps))
        shift, scale = vae_shift_scale(model.vae)
        self.inputs = []
        for n, ex in enumerate(examples):
            e = latents.data[(n, False)]
            latent = (e["mean"] - shift) * scale  # the mean: no draw from the VAE's distribution either
            g = torch.Generator().manual_seed(seed * 1_000_003 + n)
            noise = torch.randn((len(self.t), *latent.shape), generator=g)
            w, h = ex.size
            time_ids = sdxl_time_ids(tuple(e["original"].tolist()), tuple(e["crop"].tolist()), (h, w))
            self.inputs.append((latent, noise, time_ids, ex.caption))

    @property
    def description(self) -> str:
        n = len(self.examples)
        return f"{n} {self.label[:-1] if n == 1 else self.label} × {len(self.t)} timesteps"

    def measure(self, unet, device, autocast, text_encoders=()) -> float:
        """The mean loss over every image and timestep (adapter dropout off: the modules are put in eval
        mode, and back after)."""
        import torch

        modules = [unet, *text_encoders]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for inputs in self.inputs:
                    pred, target = self._predict(unet, *inputs, device, autocast)
                    total += torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="sum").item()
                    count += target.numel()
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)
        return total / count

    def _predict(self, unet, latent, noise, time_ids, caption, device, autocast):
        """(prediction, target) for one image at every fixed timestep, as one batch."""
        from .encode import encode_text

        k = len(self.t)
        latents = latent.unsqueeze(0).expand(k, *latent.shape).to(device)
        noise, t = noise.to(device), self.t.to(device)
        if self.text is not None:
            embeds, pooled = self.text.batch([caption])
        else:
            embeds, pooled = encode_text(self.model, [caption], device)
        embeds = embeds.to(device).expand(k, *embeds.shape[1:])
        extra = None
        if self.model.is_xl:
            extra = {"text_embeds": pooled.to(device).expand(k, *pooled.shape[1:]),
                     "time_ids": time_ids.to(device).unsqueeze(0).expand(k, -1)}
        noisy = self.sched.add_noise(latents, noise, t)
        target = self.sched.get_velocity(latents, noise, t) if self.model.prediction_type == "v_prediction" else noise
        with autocast():
            return unet(noisy, t, embeds, added_cond_kwargs=extra).sample, target


def best_of(rows: list[dict]) -> tuple[Measurement | None, int]:
    """The lowest validation loss in metrics rows, and how many measurements came after it."""
    best, since = None, 0
    for r in rows:
        if "val_loss" not in r:
            continue
        if best is None or r["val_loss"] < best.loss:
            best, since = Measurement(r["step"], r["val_loss"]), 0
        else:
            since += 1
    return best, since
