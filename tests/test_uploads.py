"""Uploads become a dataset folder in the workspace; everything is checked before anything is written."""
import io
import stat
import zipfile

import pytest
from PIL import Image

from trainer.errors import LoraLabError
from ui import uploads
from ui.context import AppContext
from ui.scope import visitor
from ui.uploads import save_uploads


def png_bytes(colour=(1, 2, 3)):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path, entries, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in entries.items() if isinstance(entries, dict) else entries:
            z.writestr(name, data)
    return path


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def assert_nothing_written(ctx):
    assert files_under(ctx.workspace / "datasets") == []


def test_zip_and_loose_files_become_a_dataset(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    z = make_zip(tmp_path / "set.zip", {"photos/a.png": png_bytes(), "photos/a.txt": "a cat", "notes.pdf": b"x",
                                        "__MACOSX/photos/._a.png": b"junk", "win\\b.png": png_bytes()})
    loose = tmp_path / "b c.png"
    loose.write_bytes(png_bytes())
    dest = save_uploads(ctx, [str(z), str(loose)], "my set")
    assert dest == ctx.workspace / "datasets" / "my-set"
    assert (dest / "photos" / "a.txt").read_text() == "a cat"
    assert (dest / "b-c.png").exists() and (dest / "win" / "b.png").exists()
    assert files_under(dest) == ["b-c.png", "photos", "photos/a.png", "photos/a.txt", "win", "win/b.png"]
    assert files_under(ctx.workspace / "datasets") == ["my-set", *[f"my-set/{f}" for f in files_under(dest)]]


def test_an_existing_dataset_is_never_written_into(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes())
    first = save_uploads(ctx, [str(img)], "set")
    img.write_bytes(png_bytes((9, 9, 9)))
    second = save_uploads(ctx, [str(img)], "set")
    assert (first.name, second.name) == ("set", "set-2")
    assert (first / "a.png").read_bytes() == png_bytes()


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "a/../../evil.png", "..\\evil.png",
                                  "photos\\..\\..\\evil.png", "C:/evil.png", "c:evil.png", "../notes.pdf"])
def test_unsafe_zip_paths_are_refused_before_anything_is_written(tmp_path, name):
    ctx = AppContext.create(tmp_path / "ws")
    # Good entries first: the old extractor had written them before it reached the bad one.
    z = make_zip(tmp_path / "bad.zip", [("ok1.png", png_bytes()), ("ok1.txt", "fine"), (name, png_bytes())])
    with pytest.raises(LoraLabError, match="unsafe path") as e:
        save_uploads(ctx, [str(z)], "bad")
    assert "bad.zip" in str(e.value) and "nothing was saved" in str(e.value)
    assert_nothing_written(ctx)
    assert not (tmp_path / "evil.png").exists()


def test_a_symlink_entry_is_refused(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    link = zipfile.ZipInfo("photos/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    z = make_zip(tmp_path / "link.zip", [("ok.png", png_bytes()), (link, "../../../etc/passwd")])
    with pytest.raises(LoraLabError, match="unsafe path.*link.png"):
        save_uploads(ctx, [str(z)], "linked")
    assert_nothing_written(ctx)


def test_names_that_clean_alike_stay_distinct_and_keep_their_captions(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    colours = {"a b": (1, 0, 0), "a-b": (0, 1, 0), "a?b": (0, 0, 1)}
    entries = []
    for stem, colour in colours.items():
        entries += [(f"{stem}.png", png_bytes(colour)), (f"{stem}.txt", f"caption of {stem}")]
    z = make_zip(tmp_path / "clash.zip", entries)
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a b.png").write_bytes(png_bytes((5, 5, 5)))
    (loose / "a b.txt").write_text("the loose one")
    dest = save_uploads(ctx, [str(z), str(loose / "a b.png"), str(loose / "a b.txt")], "clash")
    pngs = sorted(p for p in dest.iterdir() if p.suffix == ".png")
    assert len(pngs) == 4 and {p.name for p in pngs} == {"a-b.png", "a-b-2.png", "a-b-3.png", "a-b-4.png"}
    assert (dest / "a-b.png").read_bytes() == png_bytes(colours["a-b"])  # an already safe name is kept
    captions = {(p.read_bytes(), p.with_suffix(".txt").read_text()) for p in pngs}
    expected = {(png_bytes(c), f"caption of {s}") for s, c in colours.items()}
    assert captions == expected | {(png_bytes((5, 5, 5)), "the loose one")}


def test_folders_that_clean_alike_stay_apart(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    z = make_zip(tmp_path / "f.zip", {"ça/x.png": png_bytes((1, 1, 1)), "a/x.png": png_bytes((2, 2, 2)),
                                      "10_my cat/x.png": png_bytes()})
    dest = save_uploads(ctx, [str(z)], "f")
    assert (dest / "a" / "x.png").read_bytes() == png_bytes((2, 2, 2))
    assert (dest / "a-2" / "x.png").read_bytes() == png_bytes((1, 1, 1))
    assert (dest / "10_my-cat" / "x.png").exists()  # still a kohya repeat folder


def test_the_same_name_in_two_zips_is_kept_twice_with_its_own_caption(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    one = make_zip(tmp_path / "one.zip", {"10_cat/001.png": png_bytes((1, 1, 1)), "10_cat/001.txt": "first"})
    two = make_zip(tmp_path / "two.zip", {"10_cat/001.png": png_bytes((2, 2, 2)), "10_cat/001.txt": "second"})
    dest = save_uploads(ctx, [str(one), str(two)], "two")
    assert (dest / "10_cat" / "001.txt").read_text() == "first"
    assert (dest / "10_cat" / "001-2.txt").read_text() == "second"
    assert (dest / "10_cat" / "001-2.png").read_bytes() == png_bytes((2, 2, 2))


def test_caps_bound_the_whole_upload_not_each_zip(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_UPLOAD_FILES", 5)
    ctx = AppContext.create(tmp_path / "ws")
    zips = [make_zip(tmp_path / f"z{i}.zip", {f"{i}-{k}.png": png_bytes() for k in range(2)}) for i in range(3)]
    with pytest.raises(LoraLabError, match="holds 6 images and captions; at most 5"):
        save_uploads(ctx, [str(z) for z in zips], "many")
    assert_nothing_written(ctx)
    monkeypatch.setattr(uploads, "MAX_UPLOAD_FILES", 2000)
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 250)  # a zip of two 98-byte PNGs and one more
    loose = tmp_path / "x.png"
    loose.write_bytes(png_bytes())
    with pytest.raises(LoraLabError, match="unpacks to .* at most"):
        save_uploads(ctx, [str(zips[0]), str(loose)], "big")  # each alone is under the cap
    assert_nothing_written(ctx)


def test_a_zip_bomb_is_refused_by_its_ratio(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    z = make_zip(tmp_path / "bomb.zip", {"ok.png": png_bytes(), "huge.bmp": bytes(40 * 1024**2)},
                 compression=zipfile.ZIP_DEFLATED)
    assert z.stat().st_size < 1024**2
    with pytest.raises(LoraLabError, match="bomb.zip.*zip bomb"):
        save_uploads(ctx, [str(z)], "bomb")
    assert_nothing_written(ctx)


def test_space_visitors_have_a_running_total(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LAB_SPACE_MAX_UPLOAD_FILES", "5")
    ctx = AppContext.create(tmp_path / "ws", space=True)
    token = visitor.set("alice")
    try:
        for i in range(2):
            z = make_zip(tmp_path / f"a{i}.zip", {f"{k}.png": png_bytes() for k in range(2)})
            save_uploads(ctx, [str(z)], f"set{i}")
        z = make_zip(tmp_path / "a2.zip", {f"{k}.png": png_bytes() for k in range(2)})
        before = files_under(ctx.workspace / "datasets")
        with pytest.raises(LoraLabError, match=r"at most 200 MB and 5 files .* yours hold .* in 4 files.*adds .* in 2"
                                               r".*delete a dataset"):
            save_uploads(ctx, [str(z)], "set2")
        assert files_under(ctx.workspace / "datasets") == before
    finally:
        visitor.reset(token)
    token = visitor.set("bob")  # another visitor's total is their own
    try:
        assert save_uploads(ctx, [str(z)], "set2").is_dir()
    finally:
        visitor.reset(token)
    monkeypatch.setenv("LORA_LAB_SPACE_MAX_UPLOAD_MB", "0.0001")
    with pytest.raises(LoraLabError, match="at most 104 bytes and 5 files"):
        save_uploads(ctx, [str(z)], "tiny")


def test_the_lab_server_has_no_running_total(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LAB_SPACE_MAX_UPLOAD_FILES", "1")
    ctx = AppContext.create(tmp_path / "ws")
    z = make_zip(tmp_path / "a.zip", {f"{k}.png": png_bytes() for k in range(2)})
    for i in range(2):
        save_uploads(ctx, [str(z)], f"set{i}")


def test_what_is_not_an_image_is_named(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    doc = tmp_path / "report.docx"
    doc.write_bytes(b"PK not really")
    with pytest.raises(LoraLabError, match="None of the uploaded files are images.*report.docx"):
        save_uploads(ctx, [str(doc)], "x")
    z = make_zip(tmp_path / "docs.zip", {"report.docx": b"x", "notes/a.txt": "only a caption"})
    with pytest.raises(LoraLabError, match="docs.zip. holds no images .found: .report.docx.*notes/a.txt"):
        save_uploads(ctx, [str(z)], "x")
    empty = make_zip(tmp_path / "empty.zip", {})
    with pytest.raises(LoraLabError, match="holds no images .it is empty"):
        save_uploads(ctx, [str(empty)], "x")
    not_zip = tmp_path / "fake.zip"
    not_zip.write_bytes(b"hello")
    with pytest.raises(LoraLabError, match="fake.zip. is not a readable zip"):
        save_uploads(ctx, [str(not_zip)], "x")
    with pytest.raises(LoraLabError, match="No files uploaded"):
        save_uploads(ctx, [], "x")
    assert_nothing_written(ctx)


def test_a_damaged_zip_leaves_nothing_behind(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    z = make_zip(tmp_path / "crc.zip", [("a.png", png_bytes()), ("b.png", png_bytes((7, 7, 7)))])
    data = bytearray(z.read_bytes())
    at = data.find(png_bytes((7, 7, 7))[45:60])  # inside b.png's stored bytes: its CRC no longer matches
    data[at] ^= 0xFF
    z.write_bytes(bytes(data))
    with pytest.raises(LoraLabError, match="crc.zip. is damaged at .b.png.; nothing was saved"):
        save_uploads(ctx, [str(z)], "crc")
    assert_nothing_written(ctx)


def test_messages_never_carry_a_whole_long_name(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    long = "../" + "x" * 5000 + ".png"
    z = make_zip(tmp_path / "long.zip", {long: png_bytes()})
    with pytest.raises(LoraLabError) as e:
        save_uploads(ctx, [str(z)], "long")
    assert len(str(e.value)) < 400 and "xxx…" in str(e.value)
    doc = tmp_path / ("y" * 200 + ".docx")
    doc.write_bytes(b"x")
    with pytest.raises(LoraLabError) as e:
        save_uploads(ctx, [str(doc)], "long")
    assert len(str(e.value)) < 400


def test_the_upload_button_shows_a_refusal_and_leaves_the_loaded_dataset_alone(tmp_path):
    import gradio as gr

    from ui import dataset_tab

    ctx = AppContext.create(tmp_path / "ws")
    with gr.Blocks() as demo:
        dataset_tab.build(ctx)
    (upload,) = [f.fn for f in demo.fns.values() if f.fn.__name__ == "on_upload"]
    good = make_zip(tmp_path / "good.zip", {"a.png": png_bytes(), "a.txt": "a cat"})
    message, source, counts, *_, ds, page = upload([str(good)], "good")
    assert "Saved the upload as `datasets/good`" in message and source.endswith("good") and page == 1
    assert "**1 images**" in counts and ds.items[0].caption == "a cat"
    bad = make_zip(tmp_path / "bad.zip", {"b.png": png_bytes(), "../c.png": png_bytes()})
    message, *rest = upload([str(bad)], "bad")
    assert message.startswith("⚠️ `bad.zip` contains an unsafe path")
    assert all(r == gr.skip() for r in rest)  # source, gallery and the loaded dataset stay as they were
