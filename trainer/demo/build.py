"""Build `tiny-demo`: a tiny SD 1.x-shaped model trained on the CPU to draw flat shapes from captions.

`python -m trainer build-demo-model OUT` runs it: from a seed, with the real SD 1.x classes
(AutoencoderKL, UNet2DConditionModel, CLIPTextModel, a CLIP tokenizer, a DDPM-style schedule).

1. The VAE learns to encode 64 px shape pictures into 16×16×4 latents (on 32 px crops; shapes in the
   grammar's colours and in any colour, so it can draw colours the captions never name).
2. A pool of pictures is encoded once; the UNet and the text encoder then learn together on it,
   with 10 % of captions dropped (so classifier-free guidance works) and Min-SNR loss weights, and
   an exponential moving average of their weights is what gets saved.
3. The result is written as a diffusers folder in fp16 safetensors.

Every choice here was measured (see the README's "The demo model"): whole-word tokens (not letters)
so "red" is one token; captions varied (`shapes.varied_caption`) so that a trigger word in front does
not shift what the model reads; cross-attention in every block but the lowest.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shapes import WORDS, random_scene, varied_caption

SIZE = 64


@dataclass
class Recipe:
    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_crop: int = 32  # the VAE is convolutional: it learns on 32 px crops, 4 times cheaper than whole pictures
    pool: int = 20000
    steps: int = 4500
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    min_snr: float = 5.0  # 0: plain MSE
    ema: float = 0.999
    channels: tuple = (32, 64, 64)
    text_width: int = 64


def make_parts(r: Recipe) -> dict:
    """Untrained components of the demo model (its shape), from the recipe's seed."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.tiny import word_tokenizer

    torch.manual_seed(r.seed)
    tok = word_tokenizer(WORDS)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=r.text_width, intermediate_size=2 * r.text_width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=r.text_width,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_act="quick_gelu"))
    c = tuple(r.channels)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=c,
        norm_num_groups=16, cross_attention_dim=r.text_width, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * (len(c) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(c) - 1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=SIZE)
    sched = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    return {"tokenizer": tok, "text_encoder": te, "unet": unet, "vae": vae, "scheduler": sched}


def _pixels(images):
    import torch

    a = np.stack([np.asarray(i, np.float32) for i in images]) / 127.5 - 1
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def any_colour_scene(rng):
    """A shape in any colour (at least 80 RGB apart from its background) on one of the grammar's
    backgrounds: the VAE sees these as well, so it can encode and draw colours outside the grammar.
    Trained on the grammar's colours alone it could not (a pink picture came back green), and no LoRA
    could then teach the model a new colour. (Random backgrounds as well made the VAE's task so much
    harder that 600 steps left it blurring purple into blue.)"""
    from .shapes import BACKGROUNDS, SHAPES, draw, random_box

    background = list(BACKGROUNDS.values())[rng.integers(len(BACKGROUNDS))]
    while True:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if np.linalg.norm(np.subtract(colour, background)) > 80:
            break
    return draw(SHAPES[rng.integers(len(SHAPES))], colour, background, random_box(rng))


def train_vae(vae, r: Recipe, rng, device, log) -> None:
    import torch

    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(r.vae_steps):
        x = _pixels([random_scene(rng)[0] if i % 2 else any_colour_scene(rng) for i in range(r.vae_batch)])
        if r.vae_crop < SIZE:
            left, top = (int(v) for v in rng.integers(0, SIZE - r.vae_crop + 1, 2))
            x = x[:, :, top:top + r.vae_crop, left:left + r.vae_crop]
        x = x.contiguous().to(device)
        for g in opt.param_groups:
            g["lr"] = _lr(step, r.vae_steps, r.vae_lr, 50)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = torch.nn.functional.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == r.vae_steps - 1:
            log(f"vae step {step + 1}/{r.vae_steps}  loss {loss.item():.4f}  {time.time() - t0:.0f} s")
    vae.eval().requires_grad_(False)


def encode_pool(vae, tok, r: Recipe, rng, device, log):
    """The pool's latent means and deviations, token ids, and labels; sets the VAE's scaling factor."""
    import torch

    means, stds, ids, labels = [], [], [], []
    with torch.no_grad():
        for start in range(0, r.pool, 256):
            scenes = [random_scene(rng) for _ in range(min(256, r.pool - start))]
            dist = vae.encode(_pixels([s[0] for s in scenes]).to(device)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
            captions = [varied_caption(*s[2], rng) for s in scenes]
            ids.append(tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids)
            labels.extend(s[2] for s in scenes)
    mean, std = torch.cat(means), torch.cat(stds)
    scale = float(1 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"encoded {r.pool} pictures; latent scaling factor {scale:.4f}")
    return mean, std, torch.cat(ids), labels


class Ema:
    def __init__(self, modules, decay):
        self.decay, self.live = decay, modules
        self.copies = [copy.deepcopy(m).requires_grad_(False) for m in modules]

    def update(self, step: int):
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in zip(self.live, self.copies):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - d)


def train_denoiser(parts: dict, pool, r: Recipe, device, log, every=None, on_check=None) -> tuple:
    """Train UNet and text encoder together; returns their moving averages (what is saved)."""
    import torch
    from diffusers import DDPMScheduler

    unet, te = parts["unet"].to(device).train(), parts["text_encoder"].to(device).train()
    mean, std, ids, _ = pool
    empty = parts["tokenizer"]([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    alphas = ddpm.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    scale = parts["vae"].config.scaling_factor
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=1e-2)
    ema = Ema([unet, te], r.ema)
    g = torch.Generator().manual_seed(r.seed + 1)
    t0, avg = time.time(), None
    for step in range(r.steps):
        idx = torch.randint(len(mean), (r.batch,), generator=g)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        tokens = ids[idx].clone()
        tokens[torch.rand(r.batch, generator=g) < r.caption_dropout] = empty
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, 1000, (r.batch,), generator=g)
        lat, noise, t, tokens = lat.to(device), noise.to(device), t.to(device), tokens.to(device)
        noisy = ddpm.add_noise(lat, noise, t)
        for gr in opt.param_groups:
            gr["lr"] = _lr(step, r.steps, r.lr, r.warmup)
        pred = unet(noisy, t, te(tokens)[0]).sample
        err = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        w = torch.clamp(snr[t], max=r.min_snr) / snr[t] if r.min_snr else torch.ones_like(err)
        loss = (err * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        avg = loss.item() if avg is None else 0.99 * avg + 0.01 * loss.item()
        if step % 500 == 0 or step == r.steps - 1:
            log(f"denoiser step {step + 1}/{r.steps}  loss {avg:.4f}  {time.time() - t0:.0f} s")
        if every and on_check and (step + 1) % every == 0:
            on_check(step + 1, *ema.copies)
    return tuple(e.eval() for e in ema.copies)


def _say(msg: str) -> None:
    print(msg, flush=True)


def build(out: Path, r: Recipe | None = None, device: str = "cpu", log=_say, every=None, on_check=None) -> Path:
    """Train and write the demo model to `out` (a diffusers folder, fp16 safetensors)."""
    import torch

    r = r or Recipe()
    torch.manual_seed(r.seed)
    rng = np.random.default_rng(r.seed)
    t0 = time.time()
    parts = make_parts(r)
    train_vae(parts["vae"], r, rng, device, log)
    pool = encode_pool(parts["vae"], parts["tokenizer"], r, rng, device, log)
    unet, te = train_denoiser(parts, pool, r, device, log, every, on_check)
    parts.update(unet=unet, text_encoder=te)
    path = save(parts, Path(out))
    log(f"built {path} in {(time.time() - t0) / 60:.1f} min")
    return path


def save(parts: dict, out: Path) -> Path:
    import torch

    from ..sampling import _pipeline_classes

    for k in ("unet", "text_encoder", "vae"):
        parts[k] = parts[k].to("cpu", torch.float16)
    pipe = _pipeline_classes()[0](**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    for k in ("unet", "text_encoder", "vae"):
        parts[k].float()
    return out
