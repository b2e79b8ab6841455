"""The original (LDM / SGM) names of a diffusers UNet's layers.

Single-file checkpoints, ComfyUI (`diffusion_model.input_blocks.4.1.…`) and sd-scripts' SDXL LoRAs
(`lora_unet_input_blocks_4_1_…`) name the UNet's layers as the original Stable Diffusion code did.
This is the inverse of diffusers' single-file conversion, after diffusers' own
scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any block count so the
tiny models map too. diffusers has no exported name map for this direction (its
`_maybe_map_sgm_blocks_to_diffusers` guesses the block layout, and takes SD 1.5's first up block's
upsampler for an attention).
"""
from __future__ import annotations

RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
          ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
WHOLE = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
         ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
         ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]


def block_pairs(config) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) for every block of a UNet with this config."""
    n, L = len(config.block_out_channels), config.layers_per_block
    pairs = []
    for i in range(n):
        down_attn = "CrossAttn" in config.down_block_types[i]
        up_attn = "CrossAttn" in config.up_block_types[i]
        for j in range(L):
            pairs.append((f"input_blocks.{(L + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn:
                pairs.append((f"input_blocks.{(L + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(L + 1):
            pairs.append((f"output_blocks.{(L + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn:
                pairs.append((f"output_blocks.{(L + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(L + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{(L + 1) * i + L}.{2 if up_attn else 1}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


def to_ldm(name: str, pairs: list[tuple[str, str]]) -> str:
    """A diffusers UNet parameter or module name in the LDM layout (module names without a trailing dot)."""
    new = name + "."
    for sd, hf in WHOLE:
        if new.startswith(hf):
            new = sd + new[len(hf):]
    for sd, hf in pairs:
        if new.startswith(hf):
            new = sd + new[len(hf):]
            if "resnets" in hf:
                for sd_inner, hf_inner in RESNET:
                    new = new.replace(f".{hf_inner}.", f".{sd_inner}.")
            break
    return new[:-1]


def unet_ldm_names(unet) -> dict[str, str]:
    """{diffusers module name: LDM module name} for every module of `unet`."""
    pairs = block_pairs(unet.config)
    return {name: to_ldm(name, pairs) for name, _ in unet.named_modules() if name}
