"""Uploads become a dataset folder in the workspace; unsafe zips are refused."""
import io
import zipfile

import pytest
from PIL import Image

from trainer.errors import LoraLabError
from ui.context import AppContext
from ui.dataset_tab import save_uploads


def png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path, entries):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def test_zip_and_loose_files_become_a_dataset(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    z = make_zip(tmp_path / "set.zip", {"photos/a.png": png_bytes(), "photos/a.txt": "a cat", "notes.pdf": b"x"})
    loose = tmp_path / "b c.png"
    loose.write_bytes(png_bytes())
    dest = save_uploads(ctx, [str(z), str(loose)], "my set")
    assert dest == ctx.workspace / "datasets" / "my-set"
    assert (dest / "photos" / "a.txt").read_text() == "a cat"
    assert (dest / "b-c.png").exists() and not (dest / "notes.pdf").exists()


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "a/../../evil.png"])
def test_zip_path_traversal_is_refused(tmp_path, name):
    ctx = AppContext.create(tmp_path / "ws")
    z = make_zip(tmp_path / "bad.zip", {name: png_bytes()})
    with pytest.raises(LoraLabError, match="unsafe path"):
        save_uploads(ctx, [str(z)], "bad")
    assert not (tmp_path / "evil.png").exists()


def test_nothing_usable_is_explained(tmp_path):
    ctx = AppContext.create(tmp_path / "ws")
    doc = tmp_path / "readme.pdf"
    doc.write_bytes(b"%PDF")
    with pytest.raises(LoraLabError, match="None of the uploaded files"):
        save_uploads(ctx, [str(doc)], "x")
    with pytest.raises(LoraLabError, match="No files uploaded"):
        save_uploads(ctx, [], "x")
