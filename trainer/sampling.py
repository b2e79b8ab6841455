"""Image generation: sample images during training and the test tab, from one function."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .errors import LoraLabError

SCHEDULERS = {
    "euler_a": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
}


def _pipeline_classes():
    """diffusers' SD pipelines import CLIP/SigLIP image processors, and transformers 5 warns on every first
    use that torchvision is missing. We neither need torchvision (no safety checker, no image
    encoder) nor want it (its wheels pull a CUDA torch onto CPU machines), so that warning is hidden."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    finally:
        hf_logging.set_verbosity(level)
    return StableDiffusionPipeline, StableDiffusionXLPipeline


def make_pipeline(model, unet=None, scheduler: str = "euler_a"):
    import diffusers

    StableDiffusionPipeline, StableDiffusionXLPipeline = _pipeline_classes()

    if scheduler not in SCHEDULERS:
        raise LoraLabError(f"Unknown sampler {scheduler!r}.", f"Use one of: {', '.join(SCHEDULERS)}.")
    sched = getattr(diffusers, SCHEDULERS[scheduler]).from_config(model.scheduler.config)
    parts = dict(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                 unet=unet or model.unet, scheduler=sched)
    if model.is_xl:
        pipe = StableDiffusionXLPipeline(text_encoder_2=model.text_encoders[1], tokenizer_2=model.tokenizers[1],
                                         **parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def for_generation(model, device) -> None:
    """Ready a base model for the Test tab and `python -m trainer sample` on `device`: UNet and text
    encoders in the format the device computes fast (bf16/fp16 on a GPU, fp32 on the CPU), the VAE in
    bf16 or else fp32 (SDXL's VAE overflows in fp16; bf16 has fp32's range). The model stays in main
    memory: `generate` moves it to the device for each call, so the GPU is free for training between."""
    import torch

    from .precision import DTYPE, native

    dtype = DTYPE[native(torch.device(device))]
    for m in [model.unet, *model.text_encoders]:
        torch.nn.Module.to(m, dtype=dtype)  # torch's `to`: diffusers' prints a bogus warning on casts
    torch.nn.Module.to(model.vae, dtype=dtype if dtype == torch.bfloat16 else torch.float32)


@contextmanager
def on_device(modules, device):
    """Move modules to `device` for a while, then back where they were."""
    before = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, d in zip(modules, before):
            m.to(d)


def decode(pipe, latents) -> list:
    """Latents → PIL images with the VAE in its own format: the pipelines would hand it the UNet's
    (fp16 NaNs in SDXL's VAE), and the latents are scaled back as the trainer's cache scaled them.
    Call it outside autocast, whose fp16 would undo the VAE's fp32."""
    from .encode import vae_shift_scale

    vae = pipe.vae
    shift, scale = vae_shift_scale(vae)
    pixels = vae.decode(latents.to(vae.dtype) / scale + shift).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def prompt_inputs(pipe, model, prompts: list[str], negative: str, guidance: float, device, autocast) -> list[dict]:
    """Each prompt's embeddings (with the negative's), by the pipeline's own `encode_prompt`, as its call would
    compute them. Done first, for all prompts, with only the text encoders brought to the device: they leave
    before the UNet and the VAE work, so a sample never holds all three (SDXL's encoders are 1.6 GB)."""
    import torch

    out = []
    with on_device(model.text_encoders, device), torch.no_grad(), autocast():
        for p in prompts:
            if model.is_xl:
                pe, npe, ppe, nppe = pipe.encode_prompt(prompt=p, device=device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=guidance > 1,
                                                        negative_prompt=negative or None)
                out.append({"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
                            "negative_pooled_prompt_embeds": nppe})
            else:
                pe, npe = pipe.encode_prompt(p, device, 1, guidance > 1, negative or None)
                out.append({"prompt_embeds": pe, "negative_prompt_embeds": npe})
    return out


class SamplingStopped(Exception):
    """`should_stop` said so between two denoising steps."""


def generate(model, prompts: list[str], seed: int = 0, steps: int = 20, guidance_scale: float = 7.0,
             width: int = 0, height: int = 0, negative_prompt: str = "", scheduler: str = "euler_a",
             loras: list[tuple[Path, float]] | None = None, unet=None, device=None, progress=None,
             should_stop=None) -> list:
    """One PIL image per prompt, each from `seed`, with `loras` merged at their strengths.

    `progress(i, n)` is called before image i of n; `should_stop()` is asked after every denoising
    step, and True ends the call with SamplingStopped (a stop during sampling takes a step, not the
    rest of the images).

    `device`: where to compute (default: where the UNet is); the model's parts are moved there for
    the call and back after. A UNet in bf16/fp16 runs under autocast, so the text encoders may be
    in another format (as during training, when only the UNet was cast)."""
    import torch

    from .lora_file import AppliedLoras

    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise LoraLabError("No prompt given.", "Write at least one prompt (one per line).")
    res = model.default_resolution
    width, height = width or res, height or res
    multiple = model.vae_scale * 2 ** (len(model.unet.config.block_out_channels) - 1)
    if width % multiple or height % multiple:
        raise LoraLabError(f"Size {width}x{height} cannot be generated by this model.",
                           f"Use multiples of {multiple}.")
    device = torch.device(device) if device else next((unet or model.unet).parameters()).device
    applied = AppliedLoras(model, loras) if loras else None
    pipe = make_pipeline(model, unet=unet, scheduler=scheduler)
    dtype = pipe.unet.dtype
    images = []
    try:
        def autocast():
            return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        embeds = prompt_inputs(pipe, model, prompts, negative_prompt, guidance_scale, device, autocast)
        with on_device([model.vae, *([model.unet] if unet is None else [])], device), torch.no_grad():
            def check(pipe_, i, t, kwargs):
                if should_stop and should_stop():
                    raise SamplingStopped()
                return kwargs

            for n, p in enumerate(prompts):
                if progress:
                    progress(n, len(prompts))
                g = torch.Generator("cpu").manual_seed(int(seed))
                latents = torch.randn((1, pipe.unet.config.in_channels, height // model.vae_scale,
                                       width // model.vae_scale), generator=g)
                with autocast():
                    out = pipe(**embeds[n], num_inference_steps=steps,
                               guidance_scale=guidance_scale, width=width, height=height,
                               latents=latents.to(device, dtype), generator=g, output_type="latent",
                               callback_on_step_end=check if should_stop else None)
                images.extend(decode(pipe, out.images))
    finally:
        if applied:
            applied.remove()
    return images
