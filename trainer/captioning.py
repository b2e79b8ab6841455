"""Automatic captions: sentence captioners (BLIP, Florence-2) and a tag captioner (CLIP over a tag list).

Models come from the hub by id or from a local folder; the model is freed when captioning ends.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

from .errors import LoraLabError

CAPTIONERS = {
    "BLIP base (sentences)": ("blip", "Salesforce/blip-image-captioning-base"),
    "BLIP large (sentences)": ("blip", "Salesforce/blip-image-captioning-large"),
    "Florence-2 base (detailed sentences)": ("florence2", "florence-community/Florence-2-base"),
    "Florence-2 large (detailed sentences)": ("florence2", "florence-community/Florence-2-large"),
    "CLIP tags (comma-separated tags)": ("clip-tags", "openai/clip-vit-large-patch14"),
}
TAGS_FILE = Path(__file__).resolve().parent / "caption_tags.txt"


def _load_error(model_id: str, e: Exception) -> LoraLabError:
    return LoraLabError(f"Could not load the captioning model '{model_id}' ({type(e).__name__}).",
                        "Models download from the Hugging Face hub on first use: connect to the internet once, "
                        "or give the path of a downloaded model folder.")


class Captioner:
    """kind: blip | florence2 | clip-tags; model: a hub id or a local folder."""

    def __init__(self, kind: str, model: str, device=None):
        import torch

        self.kind, self.model_id = kind, model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if str(self.device).startswith("cuda") else torch.float32
        if not Path(model).expanduser().exists():
            from .hub_cache import require

            require(model, "captioning model", "Connect to the internet once to download it, or download it on a "
                    f"connected machine (hf download {model}) and give its folder in 'Or a downloaded model folder'.")
        try:
            if kind == "blip":
                from transformers import BlipForConditionalGeneration, BlipProcessor

                self.processor = BlipProcessor.from_pretrained(model)
                self.model = BlipForConditionalGeneration.from_pretrained(model, dtype=dtype)
            elif kind == "florence2":
                from transformers import AutoProcessor, Florence2ForConditionalGeneration

                self.processor = AutoProcessor.from_pretrained(model)
                self.model = Florence2ForConditionalGeneration.from_pretrained(model, dtype=dtype)
            elif kind == "clip-tags":
                from transformers import CLIPModel, CLIPProcessor

                self.processor = CLIPProcessor.from_pretrained(model)
                self.model = CLIPModel.from_pretrained(model, dtype=dtype)
                self.tags = [t.strip() for t in TAGS_FILE.read_text().splitlines() if t.strip()]
                self._tag_features = None
            else:
                raise LoraLabError(f"Unknown captioner kind {kind!r}.", "Use blip, florence2 or clip-tags.")
        except LoraLabError:
            raise
        except (OSError, ValueError) as e:
            raise _load_error(model, e)
        self.model.to(self.device).eval()
        self.dtype = dtype

    def caption(self, image) -> str:
        import torch

        with torch.no_grad():
            if self.kind == "blip":
                inputs = self.processor(images=image, return_tensors="pt").to(self.device, self.dtype)
                out = self.model.generate(**inputs, max_new_tokens=40)
                return self.processor.decode(out[0], skip_special_tokens=True).strip()
            if self.kind == "florence2":
                task = "<MORE_DETAILED_CAPTION>"
                inputs = self.processor(text=task, images=image, return_tensors="pt").to(self.device, self.dtype)
                out = self.model.generate(**inputs, max_new_tokens=80, num_beams=3)
                text = self.processor.batch_decode(out, skip_special_tokens=False)[0]
                parsed = self.processor.post_process_generation(text, task=task, image_size=image.size)
                return str(parsed.get(task, text)).strip()
            return ", ".join(self._top_tags(image))

    def _top_tags(self, image, k: int = 8) -> list[str]:
        import torch

        if self._tag_features is None:
            texts = self.processor(text=[f"a photo of {t}" for t in self.tags], return_tensors="pt", padding=True)
            feats = self.model.get_text_features(**texts.to(self.device))
            feats = getattr(feats, "pooler_output", feats)
            self._tag_features = torch.nn.functional.normalize(feats.float(), dim=-1)
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        img = self.model.get_image_features(pixel_values=pixels)
        img = torch.nn.functional.normalize(getattr(img, "pooler_output", img).float(), dim=-1)
        scores = (img @ self._tag_features.T)[0]
        return [self.tags[i] for i in scores.topk(min(k, len(self.tags))).indices.tolist()]

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def caption_items(items, captioner: Captioner, overwrite: bool, trigger: str, save: Callable,
                  progress: Callable | None = None) -> int:
    """Caption `items` (all, or only those without a caption); `save(item, text)` stores each at once."""
    from .data.plan import with_prefix

    todo = [it for it in items if overwrite or not it.caption.strip()]
    for n, it in enumerate(todo):
        text = with_prefix(captioner.caption(it.load()), trigger)
        save(it, text)
        if progress:
            progress(n + 1, len(todo), it, text)
    return len(todo)
