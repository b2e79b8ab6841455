"""Write a diffusers model as an original-layout (LDM) single-file checkpoint, like civitai files.

The inverse of diffusers' single-file conversion, after diffusers' own
scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any block count so the
tiny test models can be written this way.
"""

from trainer.ldm_names import block_pairs, to_ldm


def unet_to_ldm(unet) -> dict:
    pairs = block_pairs(unet.config)
    return {"model.diffusion_model." + to_ldm(k, pairs): v for k, v in unet.state_dict().items()}


def vae_to_ldm(vae) -> dict:
    n = len(vae.config.block_out_channels)
    L = vae.config.layers_per_block
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        for j in range(L):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(L + 1):
            pairs.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for k, v in vae.state_dict().items():
        new = k
        for sd, hf in pairs:
            new = new.replace(hf, sd)
        if "attentions" in k:
            for sd, hf in attn:
                new = new.replace(hf, sd)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and v.dim() == 2:
                v = v.reshape(*v.shape, 1, 1)
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(te) -> dict:
    out = {}
    for k, v in te.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out["cond_stage_model.transformer." + k] = v
    return out


def save_sd15_single_file(parts: dict, path) -> None:
    from safetensors.torch import save_file

    sd = {**unet_to_ldm(parts["unet"]), **vae_to_ldm(parts["vae"]), **clip_to_ldm(parts["text_encoder"])}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
