"""Tiny captioning models (BLIP, CLIP) built in code and saved as real model folders."""
from pathlib import Path


def make_tiny_blip(d: Path) -> Path:
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    d.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "square", "on", "white", "shape"]
    (d / "vocab.txt").write_text("\n".join(words))
    tok = BertTokenizer(str(d / "vocab.txt"))
    proc = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    cfg = BlipConfig(
        text_config={"vocab_size": len(words), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "intermediate_size": 37, "bos_token_id": 2, "sep_token_id": 3, "pad_token_id": 0,
                     "eos_token_id": 3, "encoder_hidden_size": 32},
        vision_config={"hidden_size": 32, "image_size": 32, "patch_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "intermediate_size": 37},
        projection_dim=32)
    import torch

    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(d / "model")
    proc.save_pretrained(d / "model")
    return d / "model"


def make_tiny_clip(root: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from trainer.models.tiny import tiny_tokenizer

    d = root / "model"
    tok = tiny_tokenizer()
    cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37,
                                  "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 77,
                                  "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                                  "pad_token_id": tok.pad_token_id},
                     vision_config={"hidden_size": 32, "image_size": 32, "patch_size": 8, "intermediate_size": 37,
                                    "num_hidden_layers": 1, "num_attention_heads": 4}, projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tok).save_pretrained(d)
    return d
