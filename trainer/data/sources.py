"""Turn a dataset source into (image, caption) items, reporting every problem by name.

Sources: a local folder (flat with sidecar captions, kohya `N_name` repeat folders, or `image/` +
`text/` numbered pairs) or a Hugging Face dataset (hub id, `save_to_disk` folder, parquet, or an
imagefolder with `metadata.jsonl`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from ..errors import LoraLabError, shown
from .images import IMAGE_EXTS, UnreadableImage, open_image, too_many_pixels

KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")
CAPTION_EXTS = (".txt", ".caption")


@dataclass
class Item:
    name: str                      # shown to users: a path relative to the source, or "row N"
    load: Callable[[], Image.Image]
    caption: str
    repeats: int = 1
    size: tuple[int, int] = (0, 0)
    content_id: str = ""           # changes when the image bytes change; keys the latent cache
    caption_path: Path | None = None
    image_path: Path | None = None


@dataclass
class Problem:
    name: str
    problem: str

    def __str__(self):
        return f"{self.name}: {self.problem}"


@dataclass
class Dataset:
    items: list[Item]
    problems: list[Problem] = field(default_factory=list)
    layout: str = ""

    @property
    def total_repeats(self) -> int:
        return sum(i.repeats for i in self.items)


def read_caption(path: Path) -> tuple[str, str | None]:
    """Caption text and a problem (or None). Non-UTF-8 files are read as Latin-1 and reported."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
        problem = None
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        problem = "caption is not UTF-8; read as Latin-1 (save it as UTF-8 to be sure)"
    return " ".join(text.split()), problem


def _file_item(img_path: Path, root: Path, caption: str, repeats: int, cap_path: Path | None,
               problems: list[Problem]) -> Item | None:
    rel = img_path.relative_to(root).as_posix()
    if img_path.stat().st_size == 0:
        problems.append(Problem(rel, "empty file (0 bytes); skipped"))
        return None
    try:
        with Image.open(img_path) as im:
            size = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                size = (size[1], size[0])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # a warning made an error
        problems.append(Problem(rel, "too many pixels (possible decompression bomb); skipped"))
        return None
    except (OSError, SyntaxError, ValueError):
        problems.append(Problem(rel, "not a readable image; skipped"))
        return None
    # Between Pillow's warning and its error an image opens but `open_image` refuses to decode it:
    # listed here, it is left out of the gallery and the counts as training leaves it out.
    huge = too_many_pixels(size)
    if huge:
        problems.append(Problem(rel, f"{huge}; skipped (scale it down to use it)"))
        return None
    st = img_path.stat()
    cid = hashlib.sha1(f"{img_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return Item(name=rel, load=lambda p=img_path: open_image(p), caption=caption, repeats=repeats, size=size,
                content_id=cid, caption_path=cap_path, image_path=img_path)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _sidecar(img: Path, caption_ext: str, text_dir: Path | None = None) -> Path | None:
    base = (text_dir / img.stem) if text_dir else img.with_suffix("")
    for ext in (caption_ext, *CAPTION_EXTS):
        p = base.with_name(base.name + ext)
        if p.is_file():
            return p
    return None


def _collect(root: Path, folder: Path, default_caption: str, repeats: int, caption_ext: str,
             problems: list[Problem], text_dir: Path | None = None) -> list[Item]:
    items, stems = [], {}
    for img in _images_in(folder):
        rel = img.relative_to(root).as_posix()
        if img.stem in stems:
            problems.append(Problem(rel, f"has the same name as {stems[img.stem]}; both share one caption file"))
        stems.setdefault(img.stem, rel)
        cap_path = _sidecar(img, caption_ext, text_dir)
        caption = default_caption
        if cap_path is not None:
            caption, issue = read_caption(cap_path)
            if issue:
                problems.append(Problem(cap_path.relative_to(root).as_posix(), issue))
        elif not default_caption:
            problems.append(Problem(rel, "no caption file; trains with an empty caption (plus any prefix)"))
        item = _file_item(img, root, caption, repeats, cap_path or (text_dir or folder) / (img.stem + caption_ext),
                          problems)
        if item:
            items.append(item)
    used = {i.image_path.stem for i in items} | set(stems)
    for cap in sorted((text_dir or folder).iterdir()):
        if cap.suffix.lower() in CAPTION_EXTS and cap.stem not in used:
            problems.append(Problem(cap.relative_to(root).as_posix(), "caption without an image"))
    return items


def scan_folder(root: Path, caption_ext: str = ".txt") -> Dataset:
    root = Path(root)
    problems: list[Problem] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if (root / "image").is_dir() and (root / "text").is_dir():
        items = _collect(root, root / "image", "", 1, caption_ext, problems, text_dir=root / "text")
        layout = "image/ + text/ pairs"
    elif any(KOHYA_DIR.match(d.name) for d in subdirs):
        items, layout = [], "kohya repeat folders"
        for d in subdirs:
            m = KOHYA_DIR.match(d.name)
            if not m:
                problems.append(Problem(d.name + "/", "not an N_name folder; ignored"))
                continue
            n = int(m.group(1))
            if n < 1:
                problems.append(Problem(d.name + "/", "0 repeats; ignored"))
                continue
            items += _collect(root, d, m.group(2).replace("_", " ").strip(), n, caption_ext, problems)
        for f in _images_in(root):
            problems.append(Problem(f.name, "image outside the N_name folders; ignored"))
    else:
        items, layout = _collect(root, root, "", 1, caption_ext, problems), "flat folder"
        for d in subdirs:
            if _images_in(d):
                problems.append(Problem(d.name + "/", "sub-folder with images ignored (name it N_name to "
                                        "use it as a kohya repeat folder)"))
    if not items:
        others = [p.name for p in root.iterdir()][:5]
        raise LoraLabError(
            f"No usable images in {root} ({layout}).",
            "Put .png/.jpg/.jpeg/.webp/.bmp files there"
            + (f"; found only: {', '.join(others)}" if others else " (the folder is empty)")
            + (f". Problems: {'; '.join(map(str, problems[:5]))}" if problems else "") + ".")
    return Dataset(items=items, problems=problems, layout=layout)


def _is_hf_local(path: Path) -> bool:
    return path.is_file() and path.suffix == ".parquet" or path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        or (path / "state.json").exists() or (path / "metadata.jsonl").exists()
        or any(path.glob("*.parquet")) or any(path.glob("**/*.parquet")))


def open_hf(source: str):
    """A Hugging Face dataset (or DatasetDict) from a hub id, a save_to_disk folder, parquet or an imagefolder."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists()):
            return datasets.load_from_disk(str(path))
        if path.exists():
            return load_hf_raw(path)
        from ..hub_cache import cached, hub_reachable

        if not cached(source, "dataset") and not hub_reachable():  # else datasets retries for half a minute
            raise LoraLabError(f"No folder '{source}' was found, and the Hugging Face hub, where a dataset of that "
                               "name would be, cannot be reached (offline).",
                               "Give the folder of your images (one you made here is under datasets/), or "
                               "download the hub dataset on a connected machine (save_to_disk) and give its "
                               "folder.")
        return datasets.load_dataset(source)
    except datasets.exceptions.DatasetNotFoundError:
        raise LoraLabError(f"There is no dataset '{source}' on the Hugging Face hub.",
                           "Check the id (owner/name), or give a local folder.")
    except (ConnectionError, OSError, ValueError) as e:
        raise LoraLabError(f"Could not load the dataset '{source}' ({type(e).__name__}: {e}).",
                           "If it is on the hub you may be offline: download it on a connected machine "
                           "(save_to_disk) and give the folder.")


def _image_roots(source: str) -> list[Path]:
    """Where a dataset's images may be read from by path: its own folder (a local dataset) and the
    Hugging Face caches a hub dataset is downloaded to."""
    import datasets
    from huggingface_hub import constants

    roots = [Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]
    local = Path(source).expanduser()
    if local.exists():
        roots.append(local if local.is_dir() else local.parent)
    return [r.resolve() for r in roots]


def _image_file(path: str, roots: list[Path]) -> bytes:
    """The bytes of an image a dataset row names by path: only a regular file inside the dataset or the
    caches; a row naming any other file (another user's, /dev/zero, /etc/…) is refused."""
    p = Path(path).resolve()
    if not any(p == r or r in p.parents for r in roots) or not p.is_file():
        raise LoraLabError(f"image path outside the dataset ({shown(path)})")
    return p.read_bytes()


def load_hf(source: str, split: str, image_column: str, caption_column: str) -> Dataset:
    import datasets

    ds = open_hf(source)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise LoraLabError(f"The dataset has no split '{split}'.", f"Available: {', '.join(ds)}.")
        ds = ds[split]
    cols = list(ds.column_names)
    for role, col in (("image", image_column), ("caption", caption_column)):
        if col not in cols:
            raise LoraLabError(f"The dataset has no {role} column '{col}'.", f"Its columns are: {', '.join(cols)}.")
    feat = ds.features[image_column]
    if not isinstance(feat, datasets.Image):
        raise LoraLabError(f"Column '{image_column}' holds {feat}, not images.",
                           f"Pick the image column; the columns are: {', '.join(cols)}.")
    cap_feat = ds.features[caption_column]
    if getattr(cap_feat, "dtype", None) not in ("string", "large_string"):
        raise LoraLabError(f"Column '{caption_column}' holds {cap_feat}, not text.",
                           f"Pick a text column; the columns are: {', '.join(cols)}.")
    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    items, problems = [], []
    roots = _image_roots(source)
    for i, row in enumerate(raw.select_columns([image_column, caption_column])):
        img = row[image_column] or {}
        name = f"row {i}"
        try:
            data = img.get("bytes") or (_image_file(img["path"], roots) if img.get("path") else b"")
        except LoraLabError as e:
            problems.append(Problem(name, f"{e.problem}; skipped"))
            continue
        try:
            probe = open_image(data)
        except UnreadableImage as e:
            problems.append(Problem(name, f"{e}; skipped"))
            continue
        items.append(Item(name=name, load=lambda d=data: open_image(d), caption=" ".join((row[caption_column] or "").split()),
                          size=probe.size, content_id=hashlib.sha1(data).hexdigest()))
    if not items:
        raise LoraLabError(f"The dataset '{source}' has no readable images in column '{image_column}'.")
    return Dataset(items=items, problems=problems, layout="Hugging Face dataset")


def is_hub_id(source: str) -> bool:
    """`owner/name` that is not a path on this machine (a Hugging Face dataset to download)."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).expanduser().exists()


def load_dataset_source(source: str, split: str = "train", image_column: str = "image",
                        caption_column: str = "text", caption_ext: str = ".txt") -> Dataset:
    if not source:
        raise LoraLabError("No dataset given.", "Set dataset.source to a folder of images or a Hugging Face dataset.")
    path = Path(source).expanduser()
    if path.is_dir() and not _is_hf_local(path):
        return scan_folder(path, caption_ext)
    if path.exists() or _is_hf_local(path):
        return load_hf(str(path), split, image_column, caption_column)
    if is_hub_id(source):
        return load_hf(source, split, image_column, caption_column)
    raise LoraLabError(f"Dataset '{source}' was not found.", "Give an existing folder or a hub id like owner/name.")


def hf_columns(source: str) -> tuple[list[str], list[str]]:
    """(splits, columns) of a Hugging Face dataset, for the pickers in the app."""
    import datasets

    ds = open_hf(source)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        return splits, list(ds[splits[0]].column_names)
    return ["train"], list(ds.column_names)


def load_hf_raw(path: Path):
    import datasets

    if path.is_file():
        return datasets.load_dataset("parquet", data_files=str(path))
    if (path / "metadata.jsonl").exists():
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    return datasets.load_dataset("parquet", data_files=[str(p) for p in sorted(path.glob("**/*.parquet"))])


def check_dataset(cfg) -> None:
    """What can be known of a run's dataset without the model, before its run folder is made: that it is
    there, has its image and caption columns, has images, and holds a batch. A hub id is left to the run
    (it may have to download)."""
    d = cfg.dataset
    path = Path(d.source).expanduser() if d.source else None
    if (path is None or not path.exists()) and d.source and is_hub_id(d.source):
        return
    ds = load_dataset_source(d.source, d.split, d.image_column, d.caption_column, d.caption_extension)
    if not ds.items:
        raise LoraLabError(f"The dataset {d.source} has no images that can be used.",
                           "Load it in the Dataset tab to see why, or add images.")
    if cfg.train.batch_size > ds.total_repeats:
        raise LoraLabError(f"train.batch_size {cfg.train.batch_size} is larger than the dataset "
                           f"({ds.total_repeats} images × repeats).",
                           f"Use a batch size of at most {ds.total_repeats}, or add images.")
