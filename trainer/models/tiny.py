"""Tiny models: the trained demo model's folder, and SD 1.x- and SDXL-shaped models with random weights.

`tiny-random` and `tiny-random-xl` are built in code from a fixed seed (the same model every time,
on every machine): they draw noise, and serve tests that need speed only. `tiny-demo` is a trained
model in trainer/models/tiny-demo when one has been built there (`python -m trainer build-demo-model
trainer/models/tiny-demo`), else the same random SD 1.x model; `tiny-demo-xl` is the random
SDXL-shaped one until a trained sibling exists.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "tiny-demo"
RANDOM_IDS = ("tiny-random", "tiny-random-xl", "tiny-demo-xl")
TINY_IDS = ("tiny-demo", *RANDOM_IDS)
XL_IDS = ("tiny-random-xl", "tiny-demo-xl")
_BYTE_CHARS = None


def _byte_chars() -> list[str]:
    # CLIP's byte-to-unicode table: every byte gets a printable character.
    global _BYTE_CHARS
    if _BYTE_CHARS is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_CHARS = [chr(c) for c in cs]
    return _BYTE_CHARS


def tiny_tokenizer(pad_token: str = "<|endoftext|>"):
    """A character-level CLIP tokenizer (no merges), so the vocabulary stays at 514 tokens."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)


def _bpe(word: str, merges: list) -> list[str]:
    rank = {m: i for i, m in enumerate(merges)}
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        r, i = min(pairs)
        if r == len(rank):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_tokenizer(words, pad_token: str = "<|endoftext|>"):
    """A CLIP tokenizer that reads each of `words` as one token and anything else letter by letter.

    Whole-word tokens let a tiny text encoder learn "red" or "circle" at once instead of spelling;
    a new word (a LoRA's trigger) still tokenizes, into characters. Each word gets a chain of BPE
    merges, left to right, and the function checks that every word comes out whole.
    """
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges: list[tuple[str, str]] = []
    for word in words:
        # Run BPE with the merges so far and add one for the first pair it leaves, until the word is
        # whole. A merge added later has a higher rank, so it never splits a word made whole before.
        while len(parts := _bpe(word, merges)) > 1:
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)
    for word in words:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} did not tokenize whole: {tok.convert_ids_to_tokens(ids)}"
    return tok


def _text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu",
    )


def build_tiny(kind: str = "tiny-random") -> dict:
    """The components of a tiny pipeline: unet, vae, text_encoder(s), tokenizer(s), scheduler."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    xl = kind in XL_IDS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = tiny_tokenizer()
        te = CLIPTextModel(_text_config(tok)).eval()
        unet_kwargs = dict(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, cross_attention_dim=32,
        )
        parts = {"tokenizer": tok, "text_encoder": te}
        if xl:
            tok2 = tiny_tokenizer(pad_token="!")
            te2 = CLIPTextModelWithProjection(_text_config(tok2)).eval()
            unet_kwargs.update(
                cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True,
                # SDXL's order: no attention in the first (widest) block. Loaders that guess the UNet's
                # layout from SGM names (diffusers' _maybe_map_sgm_blocks_to_diffusers) assume it.
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            )
            parts.update(tokenizer_2=tok2, text_encoder_2=te2)
        unet = UNet2DConditionModel(**unet_kwargs)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=64,
        ).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    parts.update(unet=unet, vae=vae, scheduler=sched)
    return parts


def save_tiny(out_dir: Path, kind: str = "tiny-random") -> Path:
    """Write a tiny model as a diffusers folder that loads like any other."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = build_tiny(kind)
    if kind in XL_IDS:
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
