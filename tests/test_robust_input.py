"""Bad input: every case gets a clear message naming the problem, and nothing else breaks."""
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from trainer.config import config_from_dict
from trainer.data.sources import load_dataset_source
from trainer.errors import LoraLabError
from trainer.loop import run_job


@pytest.fixture()
def nasty(tmp_path):
    """A folder with every kind of awkward file users really have."""
    d = tmp_path / "nasty set"
    d.mkdir()
    Image.new("L", (64, 64), 128).save(d / "gray.png")
    Image.new("CMYK", (64, 64), (0, 100, 200, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(d / "deep16.png")
    Image.new("P", (64, 64), 3).save(d / "palette.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 40)).save(d / "alpha.png")
    rot = Image.new("RGB", (96, 64), (0, 0, 255))
    exif = rot.getexif()
    exif[0x0112] = 8
    rot.save(d / "rotated photo.jpg", exif=exif)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(d / "ünïcødé ñame.webp")
    Image.new("RGB", (64, 64), (1, 1, 1)).save(d / "same.png")
    Image.new("RGB", (64, 64), (2, 2, 2)).save(d / "same.jpg")
    good = d / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:300])
    (d / "zero.png").write_bytes(b"")
    (d / "fake.jpg").write_text("I am text")
    (d / "gray.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (d / "lonely.txt").write_text("no image for me")
    return d


def test_awkward_files_are_read_or_reported_by_name(nasty):
    ds = load_dataset_source(str(nasty))
    names = {i.name for i in ds.items}
    problems = {p.name: p.problem for p in ds.problems}
    assert {"gray.png", "cmyk.jpg", "deep16.png", "palette.png", "alpha.png", "rotated photo.jpg",
            "ünïcødé ñame.webp", "same.png", "same.jpg"} <= names
    assert "zero.png" in problems and "empty file" in problems["zero.png"]
    assert "fake.jpg" in problems and "not a readable image" in problems["fake.jpg"]
    assert "not UTF-8" in problems["gray.txt"]
    assert problems["lonely.txt"] == "caption without an image"
    assert any("has the same name as same.jpg" in p.problem for p in ds.problems if p.name == "same.png")
    by = {i.name: i for i in ds.items}
    assert by["gray.png"].caption == "café au lait"
    assert by["rotated photo.jpg"].load().size == (64, 96)
    for item in ds.items:
        if item.name != "truncated.png":
            assert item.load().mode == "RGB"


def test_training_on_the_awkward_folder_skips_and_names_the_truncated_file(nasty, tmp_path):
    run = run_job(tiny_config(nasty, name="nasty", **{"train.steps": 2}), tmp_path)
    assert run.status()["state"] == "completed"
    log = run.log_path.read_text()
    assert "truncated.png" in log and "zero.png" in log and "fake.jpg" in log


def test_decompression_bomb_is_refused_not_decoded(tmp_path, monkeypatch):
    Image.new("RGB", (200, 200)).save(tmp_path / "bomb.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 200x200 is then > 2x the limit, like a real bomb
    ds = load_dataset_source(str(tmp_path))
    assert [i.name for i in ds.items] == ["ok.png"]
    assert "decompression bomb" in {p.name: p.problem for p in ds.problems}["bomb.png"]


def test_folder_without_images_lists_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(LoraLabError, match="No usable images.*found only: .*model.ckpt"):
        load_dataset_source(str(tmp_path))


@pytest.mark.parametrize("over, says", [
    ({"dataset.resolution": 70}, "cannot be used with this model"),
    ({"train.batch_size": 99}, "larger than the dataset"),
])
def test_configs_the_model_or_data_cannot_take(over, says, demo_dir, tmp_path):
    with pytest.raises(LoraLabError, match=says):
        run_job(tiny_config(demo_dir, name="bad", **over), tmp_path)


def test_zero_steps_and_wrong_types_are_refused_before_anything_runs():
    with pytest.raises(LoraLabError, match="train.steps: 0 is out of range"):
        config_from_dict({"train": {"steps": 0}})
    with pytest.raises(LoraLabError, match="train.batch_size: expected a whole number"):
        config_from_dict({"train": {"batch_size": 1.5}})


def test_an_sdxl_lora_on_an_sd15_model_is_refused_with_the_reason(demo_dir, tmp_path):
    from trainer.lora_file import AppliedLoras
    from trainer.models.load import load_base

    run = run_job(tiny_config(demo_dir, name="xl", **{"model.base": "tiny-random-xl", "train.steps": 1}), tmp_path)
    sd15 = load_base("tiny-random")
    before = [p.clone() for p in sd15.unet.parameters()][:3]
    with pytest.raises(LoraLabError, match="does not fit this sd15 base model.*made for sdxl"):
        AppliedLoras(sd15, [(run.lora_path("xl"), 1.0)])
    assert all(torch_equal(a, b) for a, b in zip(before, list(sd15.unet.parameters())[:3]))


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_a_100_megapixel_image_is_a_problem_by_name_and_the_rest_still_shows(tmp_path):
    from trainer.data.summary import summarize
    from ui.dataset_tab import THUMB_SIDE, gallery_page

    # 108 megapixels: over Pillow's warning limit (89), under its error limit (179), so it opens but
    # would not decode. One bit per pixel keeps it small on disk and quick to make.
    Image.new("1", (12000, 9000), 1).save(tmp_path / "huge.png")
    Image.new("RGB", (640, 480), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "b.png")
    ds = load_dataset_source(str(tmp_path))
    assert [i.name for i in ds.items] == ["a.png", "b.png"]
    s = summarize(ds)
    problems = dict(map(tuple, s["problems"]))
    assert "too many pixels (12000x9000" in problems["huge.png"] and "skipped" in problems["huge.png"]
    assert s["images"] == 2 and ["12000x9000", 1] not in s["sizes"]
    page = gallery_page(ds, 0)
    assert [caption.split(":")[0] for _, caption in page] == ["a.png", "b.png"]
    assert page[0][0].size == (THUMB_SIDE, THUMB_SIDE * 3 // 4)  # a preview, not the image itself


def test_the_gallery_shows_an_image_it_cannot_read_in_place(tmp_path):
    from ui.dataset_tab import gallery_page

    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / name)
    ds = load_dataset_source(str(tmp_path))
    (tmp_path / "a.png").unlink()  # gone between loading the folder and turning the page
    assert [c for _, c in gallery_page(ds, 0)] == ["a.png: ⚠️ file not found", "b.png: (no caption)"]
