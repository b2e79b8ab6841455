"""Every folder layout and Hugging Face form, the image quirks of real files, resize and buckets."""
import numpy as np
import pytest
from PIL import Image

from trainer.config import DatasetConfig
from trainer.data.buckets import make_buckets, pick_bucket
from trainer.data.images import fit, open_image
from trainer.data.plan import epoch_batches, plan_examples, step_caption, with_prefix
from trainer.data.sources import load_dataset_source
from trainer.errors import LoraLabError


def img(path, size=(64, 48), color=(200, 10, 10), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else None).save(path, format=fmt)
    return path


def test_flat_folder_with_txt_and_caption_sidecars(tmp_path):
    for i, ext in enumerate(["png", "jpg", "jpeg", "webp", "bmp"]):
        img(tmp_path / f"p{i}.{ext}")
    (tmp_path / "p0.txt").write_text("a red box")
    (tmp_path / "p1.caption").write_text("another")
    (tmp_path / "orphan.txt").write_text("no image")
    ds = load_dataset_source(str(tmp_path))
    caps = {i.name: i.caption for i in ds.items}
    assert len(ds.items) == 5 and caps["p0.png"] == "a red box" and caps["p1.jpg"] == "another"
    problems = {p.name: p.problem for p in ds.problems}
    assert problems["orphan.txt"] == "caption without an image"
    assert "no caption" in problems["p2.jpeg"]


def test_kohya_repeat_folders(tmp_path):
    img(tmp_path / "10_sks dog" / "a.png")
    img(tmp_path / "10_sks dog" / "b.png")
    (tmp_path / "10_sks dog" / "b.txt").write_text("sks dog on grass")
    img(tmp_path / "2_style" / "c.png")
    ds = load_dataset_source(str(tmp_path))
    by = {i.name: i for i in ds.items}
    assert by["10_sks dog/a.png"].caption == "sks dog" and by["10_sks dog/a.png"].repeats == 10
    assert by["10_sks dog/b.png"].caption == "sks dog on grass"
    assert by["2_style/c.png"].repeats == 2 and ds.total_repeats == 22


def test_image_and_text_numbered_pairs(tmp_path):
    for i in range(3):
        img(tmp_path / "image" / f"{i}.png")
        (tmp_path / "text").mkdir(exist_ok=True)
        (tmp_path / "text" / f"{i}.txt").write_text(f"caption {i}")
    ds = load_dataset_source(str(tmp_path))
    assert sorted(i.caption for i in ds.items) == ["caption 0", "caption 1", "caption 2"]


def test_unreadable_files_are_skipped_and_named(tmp_path):
    img(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    ds = load_dataset_source(str(tmp_path))
    assert [i.name for i in ds.items] == ["good.png"]
    names = {p.name for p in ds.problems}
    assert {"empty.png", "text.jpg"} <= names


def test_empty_folder_says_so(tmp_path):
    with pytest.raises(LoraLabError, match="No usable images"):
        load_dataset_source(str(tmp_path))
    with pytest.raises(LoraLabError, match="not found"):
        load_dataset_source(str(tmp_path / "missing"))


def test_exif_orientation_and_alpha_on_white(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (20, 40)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    assert open_image(tmp_path / "a.png").getpixel((3, 3)) == (255, 255, 255)
    gray16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    gray16.save(tmp_path / "g16.png")
    assert open_image(tmp_path / "g16.png").getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode, expect", [("stretch", (32, 32)), ("crop", (32, 32)), ("pad", (32, 32))])
def test_resize_modes(mode, expect):
    src = Image.new("RGB", (64, 32), (0, 0, 255))
    out, crop = fit(src, (32, 32), mode)
    assert out.size == expect
    if mode == "pad":
        assert out.getpixel((16, 2)) == (255, 255, 255) and out.getpixel((16, 16)) == (0, 0, 255)
    if mode == "crop":
        assert crop == (0, 16)
    if mode == "stretch":
        assert out.getpixel((0, 16)) == (0, 0, 255)


def test_resize_none_keeps_size_rounded_to_the_model(tmp_path):
    img(tmp_path / "a.png", size=(70, 50))
    ds = load_dataset_source(str(tmp_path))
    ex = plan_examples(ds, DatasetConfig(resolution=64, bucketing=False, resize="none"), 8)
    assert ex[0].size == (64, 48)
    ex = plan_examples(ds, DatasetConfig(resolution=64, bucketing=False, resize="crop"), 8)
    assert ex[0].size == (64, 64)
    with pytest.raises(LoraLabError, match="multiple of 8"):
        plan_examples(ds, DatasetConfig(resolution=60), 8)


def test_buckets_match_aspect_never_upscale_and_batches_share_a_bucket(tmp_path):
    buckets = make_buckets(512, 256, 1024, 64)
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert pick_bucket((1600, 900), buckets, 512, 64) == (640, 384)
    assert pick_bucket((900, 1600), buckets, 512, 64)[0] < pick_bucket((900, 1600), buckets, 512, 64)[1]
    assert pick_bucket((300, 200), buckets, 512, 64) == (256, 192)  # small image: its own size, not upscaled
    for i, size in enumerate([(128, 64)] * 5 + [(64, 128)] * 5 + [(64, 64)] * 3):
        img(tmp_path / f"{i:02d}.png", size=size)
    ds = load_dataset_source(str(tmp_path))
    ex = plan_examples(ds, DatasetConfig(resolution=64, bucket_min_side=32, bucket_max_side=128, bucket_step=16), 8)
    assert len({e.size for e in ex}) == 3
    for epoch in range(3):
        batches = epoch_batches(ex, 2, seed=1, epoch=epoch)
        assert sorted(n for b in batches for n in b) == list(range(len(ex)))
        assert all(len({ex[n].size for n in b}) == 1 for b in batches)
    assert epoch_batches(ex, 2, 1, 0) == epoch_batches(ex, 2, 1, 0) != epoch_batches(ex, 2, 1, 1)


def test_caption_prefix_dropout_and_tag_shuffle_keep_first_tags():
    import random

    assert with_prefix("a dog", "sks") == "sks, a dog" and with_prefix("sks, a dog", "sks") == "sks, a dog"
    cfg = DatasetConfig(caption_prefix="sks", shuffle_tags=True, keep_tokens=1)
    rng = random.Random(0)
    seen = {step_caption("sks, first, b, c, d, e", cfg, rng) for _ in range(30)}
    assert len(seen) > 3 and all(s.startswith("sks, first, ") for s in seen)
    drop = DatasetConfig(caption_dropout=1.0)
    assert step_caption("anything", drop, rng) == ""


def _hf_rows(n=4):
    imgs = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(n)]
    return {"image": imgs, "en_text": [f"red {i}" for i in range(n)], "cn_text": [f"红 {i}" for i in range(n)]}


def test_hf_dataset_saved_to_disk_uses_the_chosen_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict(_hf_rows()).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    ds = load_dataset_source(str(tmp_path / "ds"), caption_column="en_text")
    assert [i.caption for i in ds.items] == ["red 0", "red 1", "red 2", "red 3"]
    assert ds.items[1].load().getpixel((0, 0)) == (40, 0, 0)
    with pytest.raises(LoraLabError, match="no caption column 'text'.*en_text, cn_text"):
        load_dataset_source(str(tmp_path / "ds"))
    with pytest.raises(LoraLabError, match="not images"):
        load_dataset_source(str(tmp_path / "ds"), image_column="en_text", caption_column="cn_text")


def test_hf_parquet_and_imagefolder_metadata(tmp_path):
    import datasets

    datasets.Dataset.from_dict(_hf_rows(3)).cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "d.parquet"))
    ds = load_dataset_source(str(tmp_path / "d.parquet"), caption_column="cn_text")
    assert ds.items[2].caption == "红 2"
    folder = tmp_path / "imgfolder"
    folder.mkdir()
    lines = []
    for i in range(3):
        img(folder / f"{i}.png", size=(32, 32))
        lines.append(f'{{"file_name": "{i}.png", "text": "thing {i}"}}')
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    ds = load_dataset_source(str(folder))
    assert sorted(i.caption for i in ds.items) == ["thing 0", "thing 1", "thing 2"]


def test_a_dataset_naming_image_files_outside_itself_gets_none_of_them(tmp_path):
    """A dataset's rows may name image files by path (a hub dataset made so): only files inside the dataset
    (or the download caches) are read; another user's image, /etc or /dev/zero are skipped by name."""
    import datasets

    (tmp_path / "other").mkdir()
    (tmp_path / "ds").mkdir()
    img(tmp_path / "other" / "secret.png", size=(32, 32))
    img(tmp_path / "ds" / "mine.png", size=(32, 32))
    rows = {"image": [{"bytes": None, "path": str(tmp_path / p)} for p in ("other/secret.png", "ds/mine.png")]
            + [{"bytes": None, "path": "/dev/zero"}], "text": ["a", "b", "c"]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "ds" / "d.parquet"))
    ds = load_dataset_source(str(tmp_path / "ds" / "d.parquet"))
    assert [i.caption for i in ds.items] == ["b"]
    problems = [str(p) for p in ds.problems]
    assert len(problems) == 2 and problems[0].startswith("row 0: image path outside the dataset (/")
    assert problems[1] == "row 2: image path outside the dataset (/dev/zero); skipped"


def test_hub_dataset_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraLabError, match="No folder 'someone/no-such-dataset'.*offline.*save_to_disk"):
        load_dataset_source("someone/no-such-dataset")


def test_bulk_edit_puts_one_comma_between_a_typed_prefix_or_suffix_and_the_caption():
    from trainer.data.summary import bulk_edit

    assert bulk_edit("lablora, a circle", "mine, ") == "mine, lablora, a circle"  # was "mine,, lablora, …"
    assert bulk_edit("a circle", "lablora,", ", flat") == "lablora, a circle, flat"
    assert bulk_edit("lablora, a circle", "lablora, ") == "lablora, a circle"  # there already: not doubled
