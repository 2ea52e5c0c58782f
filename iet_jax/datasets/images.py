"""Reading image files: strict, bounded, upright, with clear errors.

One reading rule for every image iet-jax reads, the dataset builders' here and ``upscale``'s
(``evaluation/pictures.py``), both through ``open_image``:

* the size the file's header declares is checked against the pixel limit before anything is
  decoded (``MAX_PIXELS``, 200 million pixels by default; ``max_pixels=`` or the build's
  ``--max-pixels`` changes it): a 45-byte PNG header can claim 20000x20000 pixels;
* the image is turned upright as its EXIF orientation says, as photo viewers show it;
* files that cannot be read raise ``BadImageError`` naming the file (quoted with
  ``printable``: escape sequences in file names reach no terminal).

``load_rgb`` / ``decode_rgb`` return uint8 (H, W, 3). Grayscale and palette images are
expanded to RGB and an alpha channel is dropped (what OpenCV's ``IMREAD_COLOR``, used by
BasicSR, does). Everything else that cannot be read faithfully as 8-bit RGB raises
``BadImageError``: unreadable, corrupt or truncated files, 16-bit or float images (they
would be silently truncated to 8 bits otherwise), empty images, and images over the limit.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
from pathlib import Path

import numpy as np

from iet_jax.conventions.text import printable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# The most pixels (width x height) an image may declare; read when an image is opened, so
# setting it applies to every later read. A 12000x12000 photo (144 million) is accepted.
MAX_PIXELS = 200_000_000

# PIL modes that convert to 8-bit RGB without loss of meaning.
_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                      "YCbCr"}
_PILLOW_LOCK = threading.Lock()
_ORIENTATION = 0x0112  # the EXIF orientation tag


class BadImageError(ValueError):
    """An image file that cannot be used; ``path`` names it, ``reason`` says why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{printable(self.path, 500)}: {printable(reason, 500)}")


def pixel_limit(max_pixels: int | None = None) -> int:
    """``max_pixels`` if given, else the module's ``MAX_PIXELS``."""
    return MAX_PIXELS if max_pixels is None else int(max_pixels)


def check_pixels(width: int, height: int, name, max_pixels: int | None = None) -> None:
    """Raise ``BadImageError`` if ``width x height`` is over the pixel limit."""
    limit = pixel_limit(max_pixels)
    if width * height > limit:
        raise BadImageError(name, f"{width}x{height} is {width * height} pixels, more than the "
                                  f"limit of {limit} (a decompression bomb? if the image is "
                                  "genuine, raise the limit: --max-pixels)")


def png_header(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, bit depth)`` from a PNG's IHDR chunk; None if not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 29 or data[12:16] != b"IHDR":
        return None
    width, height, depth = struct.unpack(">IIB", data[16:25])
    return width, height, depth


def png_bit_depth(data: bytes) -> int | None:
    """Bit depth from a PNG's IHDR chunk (Pillow reads 16-bit RGB PNGs as 8-bit RGB)."""
    header = png_header(data)
    return None if header is None else header[2]


def _open(source, name: str, limit: int):
    """``PIL.Image.open`` (reads the header only) with the size checked against ``limit``."""
    from PIL import Image, UnidentifiedImageError

    try:
        # Pillow has a limit of its own (a warning above 89 million pixels, an error above
        # twice that): for the header read, it is raised to ours, which is checked next.
        with _PILLOW_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            if saved is not None and saved < limit:
                Image.MAX_IMAGE_PIXELS = limit
            try:
                im = Image.open(source)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Image.DecompressionBombError:
        over = 2 * max(saved or 0, limit)  # Pillow refuses above twice its own limit
        raise BadImageError(name, f"more than {over} pixels, more than the limit of {limit} (a "
                                  "decompression bomb? if the image is genuine, raise the "
                                  "limit: --max-pixels)") from None
    except UnidentifiedImageError:
        raise BadImageError(name, "not a readable image (unknown format or corrupt header)")
    except OSError as e:
        raise BadImageError(name, f"cannot read file ({e.strerror or e})")
    except (SyntaxError, ValueError, struct.error, EOFError) as e:
        raise BadImageError(name, f"corrupt image header ({e})")
    try:
        check_pixels(*im.size, name, limit)
    except BadImageError:
        im.close()
        raise
    return im


def _decode_upright(im, name: str) -> bool:
    """Decode ``im`` and turn it upright in place per its EXIF orientation; True if turned."""
    from PIL import Image, ImageOps

    try:
        im.load()
        orientation = im.getexif().get(_ORIENTATION, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            ImageOps.exif_transpose(im, in_place=True)
            return True
        return False
    except Image.DecompressionBombError as e:
        raise BadImageError(name, f"too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise BadImageError(name, f"corrupt or truncated image ({e})") from None


def exif_orientation(source, name: str | None = None, max_pixels: int | None = None) -> int:
    """The EXIF orientation (1 to 8; 1 when there is none) of an image file, for readers that
    decode pixels themselves (16-bit PNGs, read with pypng); ``upright`` applies it."""
    name = str(source if name is None else name)
    im = _open(source, name, pixel_limit(max_pixels))
    with im:
        try:
            orientation = im.getexif().get(_ORIENTATION, 1)
        except (OSError, SyntaxError, ValueError, struct.error, EOFError):
            return 1  # an unreadable EXIF block is no orientation
    return orientation if orientation in range(1, 9) else 1


def upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """An (H, W, ...) array turned as EXIF ``orientation`` says (as ``ImageOps.exif_transpose``
    turns an image)."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, -1)
    if orientation == 7:
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(array, 1)
    return array


@contextlib.contextmanager
def open_image(source, name: str | None = None, max_pixels: int | None = None):
    """Open an image (a path or a binary file object) for reading its pixels.

    Checks the declared size against the pixel limit before decoding, decodes, and turns
    the image upright as its EXIF orientation says; yields the PIL image (``format`` is the
    file's), closed on exit. Raises ``BadImageError`` naming the file (``name``, default the
    path) for files over the limit, unreadable, corrupt or truncated.
    """
    name = str(source if name is None else name)
    im = _open(source, name, pixel_limit(max_pixels))
    with im:
        _decode_upright(im, name)
        yield im


def _rgb_array(im) -> np.ndarray:
    """The pixels of a decoded RGB image as uint8 (H, W, 3), copied strip by strip.

    ``np.asarray(im)`` goes through ``im.tobytes()``, which holds the encoded chunks and
    their join at once: three copies of the image; strips keep it at two.
    """
    width, height = im.size
    out = np.empty((height, width, 3), np.uint8)
    step = max(1, (16 << 20) // (3 * width or 1))
    for y in range(0, height, step):
        strip = im.crop((0, y, width, min(height, y + step)))
        out[y:y + step] = np.frombuffer(strip.tobytes(), np.uint8).reshape(-1, width, 3)
    return out


def decode_rgb_plain(data: bytes, name: str = "<bytes>",
                     max_pixels: int | None = None) -> tuple[np.ndarray, bool]:
    """``decode_rgb``, and whether ``data`` is the 8-bit RGB PNG of exactly these pixels
    (nothing converted, no EXIF turn), which can then be stored as it is."""
    header = png_header(data)
    if header is not None:
        check_pixels(header[0], header[1], name, max_pixels)
        if header[2] > 8:
            raise BadImageError(name, f"{header[2]}-bit PNG; convert it to 8 bits per channel "
                                      "first (it would otherwise be silently truncated)")
    im = _open(io.BytesIO(data), name, pixel_limit(max_pixels))
    with im:
        turned = _decode_upright(im, name)
        mode = im.mode
        if mode not in _CONVERTIBLE_MODES:
            raise BadImageError(name, f"unsupported pixel format {mode!r} (16-bit or float "
                                      "images are not accepted; save as 8-bit RGB)")
        try:
            if mode in ("P", "PA"):
                im = im.convert("RGBA")
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = _rgb_array(im)
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
            raise BadImageError(name, f"corrupt or truncated image ({e})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImageError(name, f"unexpected decoded shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImageError(name, "empty image")
    plain = header is not None and data[25] == 2 and mode == "RGB" and not turned
    return np.ascontiguousarray(arr), plain


def decode_rgb(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to uint8 (H, W, 3), upright; see the module docstring."""
    return decode_rgb_plain(data, name, max_pixels)[0]


def load_rgb(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3); raises ``BadImageError`` with the file name."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})")
    return decode_rgb(data, str(path), max_pixels)


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
        raise FileNotFoundError(f"not a folder: {printable(folder, 500)}")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))
