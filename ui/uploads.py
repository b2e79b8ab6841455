"""Uploaded images, captions and zips → a new dataset folder in the caller's workspace.

Everything is checked before anything is written: every zip entry's path, links, the size and file
count of the whole upload (all zips and loose files together), zip bombs, and in Space mode the
visitor's running total. Names that clean to the same safe name get distinct ones, and a caption
keeps the new name of its image. Files are written into a hidden folder that is renamed into place
at the end, so a failed upload leaves nothing behind.
"""
from __future__ import annotations

import errno
import lzma
import os
import re
import secrets
import shutil
import stat
import threading
import time
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import count
from pathlib import Path, PurePosixPath

from trainer.data.images import IMAGE_EXTS
from trainer.errors import LoraLabError

CAPTION_EXTS = (".txt", ".caption")
KEPT = IMAGE_EXTS + CAPTION_EXTS
MAX_UPLOAD_FILES = 2000
MAX_UPLOAD_BYTES = 2 * 1024**3
# Photos barely compress and captions are small; deflate alone tops out near 1000:1, a bomb beyond.
MAX_ZIP_RATIO = 100
ZIP_RATIO_FLOOR = 32 * 1024**2  # below this much unpacked, a high ratio costs nothing
MAX_DEPTH = 8  # folders inside a zip
LOOSE = -1  # the source of the files uploaded as they are: together, like the root of one zip
READABLE = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, lzma.LZMAError, NotImplementedError)
HOW = f"Upload {'/'.join(IMAGE_EXTS)} images, with .txt captions, or a .zip of them."

_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


def space_limits() -> tuple[int, int]:
    """(bytes, files) one Space visitor may keep in their uploads (datasets and LoRAs)."""
    mb = float(os.environ.get("LORA_LAB_SPACE_MAX_UPLOAD_MB", 200))
    return int(mb * 1024**2), int(os.environ.get("LORA_LAB_SPACE_MAX_UPLOAD_FILES", 500))


@dataclass
class _Entry:
    source: int                  # which zip it came from, or LOOSE
    folder: tuple[str, ...]      # its folder inside the zip, as the zip names it
    stem: str
    ext: str
    size: int
    path: Path                   # the loose file, or the zip holding it
    info: zipfile.ZipInfo | None = None
    ident: tuple[int, int] | None = None  # a copied file's (device, inode) when it was listed

    @property
    def label(self) -> str:
        return _show(self.info.filename if self.info else self.path.name)


def save_uploads(ctx, files: list, name: str) -> Path:
    """Uploaded images, captions or zips → a new folder under workspace/datasets; returns the folder."""
    if not files:
        raise LoraLabError("No files uploaded.", "Drop images (or a zip of images and .txt captions) first.")
    paths = [Path(getattr(f, "name", f)) for f in files]
    entries: list[_Entry] = []
    others: list[str] = []  # names of what was uploaded but is no image or caption, for messages
    for i, src in enumerate(paths):
        if src.suffix.lower() == ".zip":
            entries += _zip_entries(src, i, others)
        elif src.suffix.lower() in KEPT:
            if not src.is_file():
                raise LoraLabError(f"The uploaded file {_show(src.name)} could not be read.", "Upload it again.")
            entries.append(_Entry(LOOSE, (), src.stem, src.suffix, src.stat().st_size, src))
        else:
            others.append(src.name)
    if not any(e.ext.lower() in IMAGE_EXTS for e in entries):
        found = _listing(others + [e.info.filename if e.info else e.path.name for e in entries])
        if len(paths) == 1 and paths[0].suffix.lower() == ".zip":
            what = f"found: {found}" if found else "it is empty"
            raise LoraLabError(f"{_show(paths[0].name)} holds no images ({what}).", HOW)
        raise LoraLabError(f"None of the uploaded files are images{f' (found: {found})' if found else ''}.", HOW)
    targets = _plan_names(entries)
    datasets = ctx.workspace / "datasets"
    with _lock_for(datasets):
        _check_totals(ctx, entries)
        return _write(entries, targets, datasets, _dataset_name(name))


def copy_dataset(ctx, folder: Path) -> Path:
    """A dataset folder the caller may read (a shared class folder) copied into their workspace's datasets, to
    edit there; returns the copy. Its images and captions only, folders (kohya `N_name`) kept, names cleaned as
    an upload's. Links are not followed, and files with other names (hard links) are left out: either could name
    a file outside what the caller may read. The walk holds each folder open (os.fwalk), and each file is opened
    again only if it is still the one the walk saw (a folder or file swapped for a link meanwhile is refused)."""
    root = Path(folder).resolve()
    entries: list[_Entry] = []
    size = 0
    for top, dirs, names, dir_fd in os.fwalk(root, follow_symlinks=False):
        rel = Path(top).relative_to(root).parts
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".")] if len(rel) < MAX_DEPTH else []
        for n in sorted(names):
            if Path(n).suffix.lower() not in KEPT:
                continue
            st = os.stat(n, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                entries.append(_Entry(LOOSE, rel, Path(n).stem, Path(n).suffix, st.st_size, Path(top) / n,
                                      ident=(st.st_dev, st.st_ino)))
                size += st.st_size
        if len(entries) > MAX_UPLOAD_FILES or size > MAX_UPLOAD_BYTES:
            break  # refused below: no need to walk the rest of a huge tree to say so
    if not any(e.ext.lower() in IMAGE_EXTS for e in entries):
        raise LoraLabError(f"{_show(root.name)} holds no image files to copy.",
                           "Copy a folder of images; a Hugging Face dataset's captions are kept in your workspace "
                           "already, so it needs no copy.")
    datasets = ctx.workspace / "datasets"
    with _lock_for(datasets):
        _check_totals(ctx, entries, "copy")
        return _write(entries, _plan_names(entries), datasets, _dataset_name(root.name))


def _zip_entries(src: Path, index: int, others: list[str]) -> list[_Entry]:
    """The images and captions of one zip, after checking every entry; nothing is extracted here."""
    label = _show(src.name)
    try:
        with zipfile.ZipFile(src) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise LoraLabError(f"{label} is not a readable zip.", "Make the zip again (or upload the images themselves).")
    out = []
    for info in infos:
        path = info.filename.replace("\\", "/")  # zips made on Windows may use either separator
        parts = PurePosixPath(path).parts
        if (path.startswith("/") or re.match(r"[A-Za-z]:", path) or ".." in parts
                or stat.S_ISLNK(info.external_attr >> 16)):
            raise LoraLabError(f"{label} contains an unsafe path ({_show(info.filename)}); nothing was saved.",
                               "Zip the images without absolute paths, '..', drive letters or links.")
        if info.is_dir() or not parts or "__MACOSX" in parts or parts[-1].startswith("._"):
            continue  # folders are made as their files need them; macOS resource forks are no images
        ext = PurePosixPath(parts[-1]).suffix
        if ext.lower() not in KEPT:
            others.append(info.filename)
            continue
        if info.flag_bits & 0x1:
            raise LoraLabError(f"{label} is password-protected ({_show(info.filename)}).", "Zip it without a password.")
        if info.compress_type not in READABLE:
            raise LoraLabError(f"{label} uses a compression LoRA Lab cannot read ({_show(info.filename)}).",
                               "Zip it again with ordinary (deflate) compression.")
        if len(parts) - 1 > MAX_DEPTH:
            raise LoraLabError(f"{label} nests folders too deeply ({_show(info.filename)}).",
                               f"Keep the images at most {MAX_DEPTH} folders deep.")
        out.append(_Entry(index, parts[:-1], PurePosixPath(parts[-1]).stem, ext, info.file_size, src, info))
    # zipfile stops reading an entry at its declared size, so these sizes bound what is written.
    unpacked = sum(e.size for e in out)
    if unpacked > ZIP_RATIO_FLOOR and unpacked > MAX_ZIP_RATIO * max(1, src.stat().st_size):
        raise LoraLabError(f"{label} would unpack to {_mb(unpacked)} from {_mb(src.stat().st_size)}, more than "
                           f"{MAX_ZIP_RATIO} times its size: it looks like a zip bomb; nothing was saved.",
                           "Zip the images themselves (photos barely compress).")
    return out


def _plan_names(entries: list[_Entry]) -> list[PurePosixPath]:
    """A distinct safe path for every entry; an image and its captions (same source, folder and stem)
    get the same new stem. Compared without case, as Windows and macOS disks would."""
    taken: set[str] = set()
    folders: dict[tuple[str, ...], tuple[str, ...]] = {(): ()}

    def claim(paths: list[str]) -> bool:
        keys = [p.casefold() for p in paths]
        if any(k in taken for k in keys):
            return False
        taken.update(keys)
        return True

    def folder(orig: tuple[str, ...]) -> tuple[str, ...]:
        if orig not in folders:
            parent, base = folder(orig[:-1]), _clean(orig[-1], "folder")
            folders[orig] = next(parent + (n,) for n in _variants(base) if claim(["/".join(parent + (n,))]))
        return folders[orig]

    for e in sorted(entries, key=lambda e: any(_clean(p, "") != p for p in e.folder)):  # clean names first
        folder(e.folder)
    # Entries with one name (same source, folder and stem) form groups; a second file with the same
    # extension (two zips' a.png, or a zip listing a name twice) starts another group.
    groups: dict[tuple, list[list[int]]] = {}
    for i, e in enumerate(entries):
        subs = groups.setdefault((e.source, e.folder, e.stem), [])
        sub = next((s for s in subs if all(entries[j].ext.casefold() != e.ext.casefold() for j in s)), None)
        if sub is None:
            subs.append(sub := [])
        sub.append(i)
    ordered = sorted((s for subs in groups.values() for s in subs),
                     key=lambda s: (_clean(entries[s[0]].stem, "") != entries[s[0]].stem, s[0]))  # clean names first
    out: list[PurePosixPath | None] = [None] * len(entries)
    for sub in ordered:
        first = entries[sub[0]]
        where = "/".join(folders[first.folder])
        for stem in _variants(_clean(first.stem, "image")):
            paths = [f"{where}/{stem}{entries[j].ext}".lstrip("/") for j in sub]
            if claim(paths):
                for j, p in zip(sub, paths):
                    out[j] = PurePosixPath(p)
                break
    return out


def _check_totals(ctx, entries: list[_Entry], kind: str = "upload") -> None:
    n, size = len(entries), sum(e.size for e in entries)
    if kind == "copy" and (n > MAX_UPLOAD_FILES or size > MAX_UPLOAD_BYTES):
        raise LoraLabError(f"The folder holds more than {MAX_UPLOAD_FILES:,} images and captions or "
                           f"{_mb(MAX_UPLOAD_BYTES)}: too much to copy at once.",
                           "Copy a smaller folder (one of its sub-folders), or ask for a smaller set.")
    if n > MAX_UPLOAD_FILES:
        raise LoraLabError(f"The upload holds {n:,} images and captions; at most {MAX_UPLOAD_FILES:,} are taken "
                           "at once.", "Upload fewer files, or split the set into several datasets.")
    if size > MAX_UPLOAD_BYTES:
        raise LoraLabError(f"The upload unpacks to {_mb(size)}; at most {_mb(MAX_UPLOAD_BYTES)} are taken at once.",
                           "Upload a smaller set, or split it into several datasets.")
    check_space_quota(ctx, size, n, f"this {kind}")


def check_space_quota(ctx, size: int, n: int, what: str = "this upload") -> None:
    """Space mode: what a visitor keeps (datasets, uploaded LoRAs, export zips, presets) plus `n` files of `size`
    bytes stays within the demo's total per visitor."""
    if not ctx.space:
        return
    from .access import disk_room

    disk_room(ctx)
    max_bytes, max_files = space_limits()
    kept = ("datasets", "loras", "exports", "presets")
    used, used_n = map(sum, zip(*(_usage(ctx.workspace / sub) for sub in kept)))
    if used + size > max_bytes or used_n + n > max_files:
        raise LoraLabError(
            f"This demo keeps at most {_mb(max_bytes)} and {max_files:,} files of uploads per visitor: yours hold "
            f"{_mb(used)} in {used_n:,} files, and {what} adds {_mb(size)} in {n:,}.",
            {"this export": "Start a new set and export fewer images", "this copy": "Copy a smaller folder"}.get(
                what, "Upload fewer or smaller files") + ", or delete a dataset you no longer need; for larger sets "
            "run LoRA Lab on your own machine.")


def _write(entries: list[_Entry], targets: list[PurePosixPath], datasets: Path, name: str) -> Path:
    datasets.mkdir(parents=True, exist_ok=True)
    for old in datasets.glob(".upload-*"):  # left by an app that was killed mid-upload
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    staging = datasets / f".upload-{secrets.token_hex(6)}"
    staging.mkdir()
    current = None
    try:
        with ExitStack() as stack:
            zips: dict[Path, zipfile.ZipFile] = {}
            for e, rel in zip(entries, targets):
                current = e
                target = staging.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                if e.info is not None and e.path not in zips:
                    zips[e.path] = stack.enter_context(zipfile.ZipFile(e.path))
                with (_open_listed(e) if e.info is None else zips[e.path].open(e.info)) as fin, \
                        open(target, "xb") as fout:
                    _copy(fin, fout, e.size)
        dest = next(datasets / n for n in _variants(name) if not (datasets / n).exists())
        staging.rename(dest)
        return dest
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        where = current.label if current else "the upload"
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise LoraLabError(f"The disk is full (writing {where}); nothing was saved.",
                               "Free some space, or upload fewer images.") from err
        # A CRC mismatch is BadZipFile; bz2 reports a broken stream as an OSError without an errno.
        if current is not None and (isinstance(err, DAMAGED) or isinstance(err, OSError) and current.info is not None
                                    and err.errno is None):
            raise LoraLabError(f"{_show(current.path.name)} is damaged at {where}; nothing was saved.",
                               "Make the zip again.") from err
        if isinstance(err, OSError):
            raise LoraLabError(f"Could not save {where} ({err.strerror or type(err).__name__}); nothing was saved.",
                               "Upload it again.") from err
        raise


def _open_listed(e: _Entry):
    """A loose file; a copied one only if it is still the file that was listed (not a link put in its place)."""
    if e.ident is None:
        return open(e.path, "rb")
    fd = os.open(e.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != e.ident or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise LoraLabError(f"{e.label} changed while it was being copied; nothing was saved.", "Copy it again.")
    return os.fdopen(fd, "rb")


def _copy(fin, fout, limit: int) -> None:
    left = limit
    while chunk := fin.read(1024 * 1024):
        left -= len(chunk)
        if left < 0:  # a loose file that grew after it was measured
            raise LoraLabError("An uploaded file changed while it was being saved; nothing was saved.",
                               "Upload it again.")
        fout.write(chunk)


def _usage(folder: Path) -> tuple[int, int]:
    total = files = 0
    for top, _, names in os.walk(folder):  # links are not followed
        for n in names:
            try:
                total += os.lstat(os.path.join(top, n)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def _lock_for(folder: Path) -> threading.Lock:
    """One upload at a time per workspace, so two at once cannot both pass the Space totals."""
    with _locks_lock:
        return _locks.setdefault(str(folder), threading.Lock())


def _dataset_name(name: str) -> str:
    from trainer.runs import safe_name

    return safe_name(name or time.strftime("upload-%Y%m%d-%H%M%S"))


def _clean(part: str, fallback: str) -> str:
    """As trainer.runs.safe_name, with a fallback of our choosing for names with no safe letter."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", part.strip()).strip(".-")[:80].strip(".-") or fallback


def _variants(base: str):
    """base, base-2, base-3, …"""
    yield base
    for k in count(2):
        yield f"{base}-{k}"


def _show(name: str, limit: int = 80) -> str:
    """A file or entry name as a message may quote it: one line, at most `limit` characters, in code."""
    text = re.sub(r"[\x00-\x1f\x7f`]", "?", str(name))
    return f"`{text if len(text) <= limit else text[: limit - 1] + '…'}`"


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(_show(n) for n in names[:most])
    return shown + (f" and {len(names) - most:,} more" if len(names) > most else "")


def _mb(n: float) -> str:
    """A size as people read it: 740 bytes, 12 KB, 3.4 MB, 200 MB, 1.9 GB."""
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 10 or unit == "GB" else f"{v:.0f} {unit}"
    return f"{int(n)} bytes"
