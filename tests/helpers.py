"""Shared test helpers: the trained model rebuilt from a run, and fixed-input model outputs."""
import torch

from trainer.adapters import add_adapter, load_adapter_state
from trainer.checkpoint import latest_checkpoint, load_checkpoint
from trainer.config import load
from trainer.models.load import load_base


def trained_model(run):
    """The base model with the adapter exactly as trained (from the run's last checkpoint)."""
    cfg = load(run.config_path)
    model = load_base(cfg.model.base)
    add_adapter(model.unet, cfg.network)
    if cfg.network.train_text_encoder:
        for te in model.text_encoders:
            add_adapter(te, cfg.network, text_encoder=True)
    adapter, _, _ = load_checkpoint(latest_checkpoint(run.checkpoints_dir))
    load_adapter_state(model.unet, {k[5:]: v for k, v in adapter.items() if k.startswith("unet.")})
    for i, te in enumerate(model.text_encoders if cfg.network.train_text_encoder else []):
        load_adapter_state(te, {k[4:]: v for k, v in adapter.items() if k.startswith(f"te{i}.")})
    return model


@torch.no_grad()
def unet_output(unet, model, text_encoders=None, seed=0, size=16):
    """The UNet's prediction for a fixed noisy latent, timestep and prompt."""
    from trainer.encode import encode_text

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([100, 700])
    if text_encoders is not None:
        model.text_encoders = text_encoders
    emb, pooled = encode_text(model, ["lablora, a red circle", "a blue square"], "cpu")
    extra = None
    if model.is_xl:
        extra = {"text_embeds": pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    return unet(x, t, emb, added_cond_kwargs=extra).sample


@torch.no_grad()
def fixed_batch_loss(model, image_dir, caption):
    """Denoising loss on one image with fixed noise and timesteps (lower = the model learned it)."""
    import torch.nn.functional as F

    from trainer.data.images import open_image, to_tensor
    from trainer.encode import encode_images, encode_text

    img = open_image(sorted(image_dir.glob("*.png"))[0]).resize((64, 64))
    mean, _ = encode_images(model.vae, to_tensor(img)[None])
    latents = mean * model.vae.config.scaling_factor
    sched = model.noise_scheduler()
    g = torch.Generator().manual_seed(7)
    emb, pooled = encode_text(model, [caption], "cpu")
    total = 0.0
    for t in [50, 200, 400, 600, 800, 950]:
        noise = torch.randn(latents.shape, generator=g)
        tt = torch.tensor([t])
        extra = None
        if model.is_xl:
            extra = {"text_embeds": pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)}
        pred = model.unet(sched.add_noise(latents, noise, tt), tt, emb, added_cond_kwargs=extra).sample
        total += F.mse_loss(pred, noise).item()
    return total / 6


def stopper(step: int):
    """(callback, control) for run_job that asks the run to stop once it reports `step`."""
    from trainer.events import Control

    control = Control()

    def callback(event):
        if event.kind == "step" and event.data["step"] == step:
            control.stop.set()

    return callback, control
