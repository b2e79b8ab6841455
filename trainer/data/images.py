"""Reading images the way users' files really are, and fitting them to a training size."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class UnreadableImage(Exception):
    """The file can't be used as an image; the message says why in plain words."""


def too_many_pixels(size: tuple[int, int]) -> str | None:
    """Why an image of `size` is refused (Pillow's decompression-bomb limit, which `open_image` keeps), or None."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        return (f"too many pixels ({size[0]}x{size[1]}, {size[0] * size[1] / 1e6:.0f} megapixels; "
                f"at most {limit / 1e6:.0f} are read)")
    return None


def open_image(src, max_side: int | None = None) -> Image.Image:
    """A path, bytes or PIL image → an RGB image, EXIF orientation applied, alpha on white.

    With `max_side`, a preview no larger than that: a JPEG is then decoded at a reduced scale.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):
                img = src
            elif isinstance(src, (bytes, bytearray)):
                img = Image.open(io.BytesIO(src))
            else:
                img = Image.open(src)
            if max_side and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage("too many pixels (possible decompression bomb)")
    except FileNotFoundError:
        raise UnreadableImage("file not found")
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).lower()
        if "truncated" in msg:
            raise UnreadableImage("the file is truncated")
        raise UnreadableImage("not a readable image")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not cost the image
        pass
    img = to_rgb(img)
    if max_side:
        img.thumbnail((max_side, max_side))
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray((arr / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def fit(img: Image.Image, size: tuple[int, int], mode: str) -> tuple[Image.Image, tuple[int, int]]:
    """Fit `img` to `size` (w, h) by `mode`; returns the image and the (top, left) crop offset.

    crop: cover then centre-crop; stretch: resize ignoring aspect; pad: contain then pad with white.
    """
    w, h = size
    if img.size == (w, h):
        return img, (0, 0)
    if mode == "stretch":
        return img.resize((w, h), Image.LANCZOS), (0, 0)
    if mode == "pad":
        s = min(w / img.width, h / img.height)
        inner = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        canvas.paste(inner, ((w - inner.width) // 2, (h - inner.height) // 2))
        return canvas, (0, 0)
    s = max(w / img.width, h / img.height)
    rw, rh = max(w, round(img.width * s)), max(h, round(img.height * s))
    img = img.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - w) // 2, (rh - h) // 2
    return img.crop((left, top, left + w, top + h)), (top, left)


def to_tensor(img: Image.Image, flip: bool = False):
    import torch

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
