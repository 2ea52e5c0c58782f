"""Reading image files for the dataset builders: strict, with clear errors.

``load_rgb`` returns uint8 (H, W, 3). Grayscale and palette images are expanded to RGB and
an alpha channel is dropped (what OpenCV's ``IMREAD_COLOR``, used by BasicSR, does).
Everything else that cannot be read faithfully as 8-bit RGB raises ``BadImageError``
naming the file: unreadable, corrupt or truncated files, 16-bit or float images (they
would be silently truncated to 8 bits otherwise), and empty images.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# PIL modes that convert to 8-bit RGB without loss of meaning.
_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                      "YCbCr"}


class BadImageError(ValueError):
    """An image file that cannot be used; ``path`` names it, ``reason`` says why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def png_bit_depth(data: bytes) -> int | None:
    """Bit depth from a PNG's IHDR chunk (Pillow reads 16-bit RGB PNGs as 8-bit RGB)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 29 or data[12:16] != b"IHDR":
        return None
    return data[24]


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to uint8 (H, W, 3); see the module docstring."""
    from PIL import Image, UnidentifiedImageError

    depth = png_bit_depth(data)
    if depth is not None and depth > 8:
        raise BadImageError(name, f"{depth}-bit PNG; convert it to 8 bits per channel first "
                                  "(it would otherwise be silently truncated)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            if mode not in _CONVERTIBLE_MODES:
                raise BadImageError(name, f"unsupported pixel format {mode!r} (16-bit or float "
                                          "images are not accepted; save as 8-bit RGB)")
            if mode != "RGB":
                if mode in ("P", "PA"):
                    im = im.convert("RGBA")
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(name, "not a readable image (unknown format or corrupt header)")
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise BadImageError(name, f"corrupt or truncated image ({e})")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImageError(name, f"unexpected decoded shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImageError(name, "empty image")
    return np.ascontiguousarray(arr)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3); raises ``BadImageError`` with the file name."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e})")
    return decode_rgb(data, str(path))


def encode_png(img: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode uint8 (H, W, 3) as PNG bytes with Pillow (no TensorFlow needed)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG",
                                                    compress_level=compress_level)
    return buf.getvalue()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))
