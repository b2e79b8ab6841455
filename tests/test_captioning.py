"""Automatic captioning with tiny BLIP and CLIP models built in code and loaded from disk."""
import pytest

from tiny_captioners import make_tiny_blip, make_tiny_clip
from trainer.captioning import Captioner, caption_items
from trainer.data.sources import load_dataset_source
from trainer.data.summary import save_caption
from trainer.data.demo import make_demo_dataset


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_blip_fills_missing_captions_with_the_trigger_first(tiny_blip, tmp_path):
    data = make_demo_dataset(tmp_path / "d", count=3, size=48)
    (data / "001.txt").unlink()
    ds = load_dataset_source(str(data))
    cap = Captioner("blip", str(tiny_blip))
    seen = []
    n = caption_items(ds.items, cap, overwrite=False, trigger="sks", save=lambda it, t: save_caption(it, t),
                      progress=lambda i, total, it, t: seen.append((i, total, it.name)))
    cap.close()
    assert n == 1 and seen == [(1, 1, "001.png")]
    text = (data / "001.txt").read_text()
    assert text.startswith("sks") and (data / "000.txt").read_text().startswith("lablora")


def test_clip_tagger_overwrites_with_tags_from_the_list(tiny_clip, tmp_path):
    data = make_demo_dataset(tmp_path / "d", count=2, size=48)
    ds = load_dataset_source(str(data))
    cap = Captioner("clip-tags", str(tiny_clip))
    caption_items(ds.items, cap, overwrite=True, trigger="", save=lambda it, t: save_caption(it, t))
    tags = (data / "000.txt").read_text().split(", ")
    assert len(tags) == 8 and all(t in cap.tags for t in tags)


def test_a_missing_model_says_how_to_get_it(tmp_path, monkeypatch):
    from trainer.errors import LoraLabError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraLabError, match="not downloaded on this machine") as e:
        Captioner("blip", "Salesforce/blip-image-captioning-base")
    assert "Or a downloaded model folder" in e.value.fix


def test_an_unreachable_hub_is_found_before_loading_not_after_minutes_of_retries(monkeypatch):
    """Offline mode not set, but no network: the hub's host is probed once instead of retried per file."""
    import huggingface_hub.constants

    from trainer.errors import LoraLabError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(LoraLabError, match="cannot be reached"):
        Captioner("clip-tags", "openai/clip-vit-large-patch14")
