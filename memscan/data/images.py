"""Reading images into uint8 H×W×C arrays, with an explicit resize policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_image(path: str | Path, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """Decode one image to uint8 H×W×C.

    ``size`` = (H, W) resizes with bicubic filtering (the policy recorded in the manifest);
    ``channels`` 1 gives grayscale (PIL mode L), 3 gives RGB. 16-bit images (modes ``I;16*``)
    are scaled by 255/65535, rounded, whatever their content; a 32-bit integer image (mode
    ``I``, whose depth the file does not say) is read as 16-bit when a value passes 255, else as
    8-bit. Palette images are converted; alpha is dropped onto black. Raises
    ``OSError``/``ValueError`` on corrupt data.
    """
    with Image.open(path) as im:
        im.load()
        return to_array(im, size, channels)


def to_array(im: Image.Image, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode != "I" or arr.max() > 255 else 255.0  # 16-bit by its mode, not its content
        im = Image.fromarray(np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def save_png(arr: np.ndarray, path: str | Path) -> None:
    """Write a uint8 H×W×C array as PNG (C = 1 as grayscale)."""
    a = np.asarray(arr)
    img = Image.fromarray(a[:, :, 0], mode="L") if a.shape[2] == 1 else Image.fromarray(a[:, :, :3])
    img.save(path, format="PNG")


def montage(images: np.ndarray, columns: int = 10, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile N×H×W×C images into one grid image (white padding), optionally upscaled."""
    n, h, w, c = images.shape
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[k]
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out
