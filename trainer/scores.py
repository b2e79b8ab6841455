"""Scores for generated images, from CLIP's image and text embeddings (transformers' CLIPModel).

- likeness: cosine similarity of an image to the mean of the training images (each embedding
  normalised first): how much it looks like what the LoRA was trained on;
- prompt: cosine similarity of an image to its prompt's text (the CLIP score, as a fraction);
- nearest / similarity: the training image it is most similar to; at COPY_SIMILARITY or more it is
  flagged as a near-copy, the sign of a LoRA that memorised its images instead of the concept.

A CLIP model is needed (a local folder, or a hub id that downloads when online); without one nothing
is scored and the UI says so — no number is invented.
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import LoraLabError

COPY_SIMILARITY = 0.95
NEEDS_MODEL = ("Scores need a CLIP model: set sample.score_model to a local CLIP folder (or a hub id such as "
               "openai/clip-vit-base-patch32 while online).")
_LOADED: dict[str, "Scorer"] = {}  # the last one only: on a shared app each request may name another model
_LOADING = threading.Lock()  # one load at a time, so two requests never hold two models


@dataclass
class Score:
    likeness: float
    prompt: float
    nearest: str
    similarity: float

    @property
    def copy(self) -> bool:
        return self.similarity >= COPY_SIMILARITY

    def caption(self) -> str:
        text = f"likeness {self.likeness:.2f} · prompt {self.prompt:.2f}"
        return text + (f" · ⚠ near-copy of {self.nearest}" if self.copy else "")

    def row(self) -> dict:
        return {**asdict(self), "copy": self.copy}


def load_scorer(spec: str) -> "Scorer":
    """The CLIP model `spec` names (kept until another is asked for)."""
    spec = (spec or "").strip()
    if not spec:
        raise LoraLabError("No CLIP model set.", NEEDS_MODEL)
    with _LOADING:
        return _LOADED.get(spec) or _load(spec)


def _load(spec: str) -> "Scorer":
    """Load `spec` in place of the model kept (called holding _LOADING)."""
    from transformers import CLIPModel, CLIPProcessor

    _LOADED.clear()  # the old one goes first: never two in memory
    local = Path(spec).expanduser()
    source = str(local) if local.is_dir() else spec
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=local.is_dir()).eval()
        processor = CLIPProcessor.from_pretrained(source, local_files_only=local.is_dir())
    except Exception as e:  # not there, offline, or not a CLIP model: all the user's to fix
        raise LoraLabError(f"The CLIP model {spec!r} could not be loaded ({str(e).splitlines()[0][:160]}).",
                           "Give a folder holding a CLIP model and its processor (config.json, the weights, "
                           "tokenizer and preprocessor files), or a hub id while online.") from None
    _LOADED[spec] = Scorer(model, processor)
    return _LOADED[spec]


@dataclass
class Reference:
    """The training images' normalised embeddings and names."""
    embeddings: object
    names: list[str]


class Scorer:
    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def images(self, images):
        import torch

        with torch.no_grad():
            inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
            out = self.model.get_image_features(**inputs)
        out = getattr(out, "pooler_output", out)  # transformers 5 may return a model output here
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def texts(self, texts: list[str]):
        import torch

        with torch.no_grad():
            inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
            out = self.model.get_text_features(**inputs)
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def reference(self, images, names: list[str], batch: int = 16) -> Reference:
        import torch

        if not images:
            raise LoraLabError("No training images to compare samples with.", "Load a dataset first.")
        return Reference(torch.cat([self.images(images[i:i + batch]) for i in range(0, len(images), batch)]),
                         list(names))

    def score(self, images, prompts: list[str], ref: Reference) -> list[Score]:
        import torch

        emb = self.images(images)
        centre = torch.nn.functional.normalize(ref.embeddings.mean(0), dim=0)
        text = self.texts(prompts)
        sims = emb @ ref.embeddings.T
        out = []
        for i in range(len(images)):
            j = int(sims[i].argmax())
            out.append(Score(float(emb[i] @ centre), float(emb[i] @ text[i]), ref.names[j], float(sims[i, j])))
        return out


def training_reference(scorer: Scorer, dataset, examples) -> Reference:
    """The reference of a run's training images (each image once)."""
    items = [dataset.items[e.index] for e in examples]
    return scorer.reference([item.load() for item in items], [item.name for item in items])


def recommend_strength(rows: list[tuple[float, float, float]]) -> tuple[float | None, str]:
    """(strength, why) from a sweep's (strength, mean likeness, mean prompt score), strength 0 included.

    The rule: the lowest strength that reaches 80 % of the likeness the sweep gains over strength 0,
    while the prompt score stays within 0.02 of strength 0's. None when the LoRA gains no likeness, or
    every strength that gains it loses prompt following.
    """
    rows = sorted(rows)
    base = next((r for r in rows if r[0] == 0), None)
    if base is None:
        raise ValueError("the sweep needs strength 0")
    gains = {s: like - base[1] for s, like, _ in rows}
    full = max(gains.values())
    if full <= 0.01:
        return None, "the LoRA does not make the images more like its training images at these strengths"
    reaching = [(s, p) for s, _, p in rows if s > 0 and gains[s] >= 0.8 * full]
    for s, p in reaching:
        if p >= base[2] - 0.02:
            return s, (f"the lowest strength with 80 % of the likeness gained ({gains[s]:+.3f} of {full:+.3f}) "
                       f"that keeps prompt following ({p:.3f} vs {base[2]:.3f} without the LoRA)")
    return None, "every strength that reaches most of the likeness loses prompt following"


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def save_recommendation(path: Path, strength: float, why: str) -> None:
    """Rewrite a LoRA file with the recommended strength in its metadata (tensors as they are, atomically)."""
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    from .runs import removed_on_failure

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    meta.update({"lora_lab_recommended_strength": f"{strength:g}", "lora_lab_recommended_strength_why": why})
    tmp = path.with_name(f".{path.name}.tmp")
    with removed_on_failure(path.parent, tmp):
        save_file(tensors, str(tmp), meta)
        os.replace(tmp, path)
