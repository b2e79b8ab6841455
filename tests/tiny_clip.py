"""A tiny CLIP built in code (random weights, no download), saved as a folder transformers loads: for
exercising the sample scores end to end. Its numbers mean nothing; an image equal to a training
image still has similarity 1 to it, which is what the near-copy check rests on."""
from pathlib import Path


def save_tiny_clip(out: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from trainer.models.tiny import _text_config, tiny_tokenizer

    out = Path(out)
    tok = tiny_tokenizer()
    # Weights 20× the usual initial scale: at the usual scale a random CLIP finds every picture alike (0.98);
    # at this one the demo dataset's different pictures are at most 0.88 alike, noise 0.64.
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8, initializer_factor=20.0)
    cfg = CLIPConfig(text_config=_text_config(tok).to_dict(), vision_config=vision.to_dict(), projection_dim=16,
                     initializer_factor=20.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(cfg).eval()
    model.save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return out
