"""Small generators of odd images, as bytes, for decoder, dataset and serve tests.

Each generator returns the encoded file and is deterministic. ``ODD_IMAGES`` maps a kind to its
generator; ``EXPECTED`` says what ``decode_image`` must produce for the decodable ones.
"""
from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def _save(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def rgb_jpeg(width: int = 32, height: int = 24, color=RED) -> bytes:
    """A plain RGB JPEG of one colour."""
    return _save(Image.new("RGB", (width, height), color), "JPEG", quality=95)


def rgb_png(width: int = 32, height: int = 24, color=RED) -> bytes:
    """A plain RGB PNG of one colour."""
    return _save(Image.new("RGB", (width, height), color), "PNG")


def gray_l_png() -> bytes:
    """8-bit grayscale (mode L), value 100."""
    return _save(Image.new("L", (16, 8), 100), "PNG")


def rgba_png() -> bytes:
    """RGBA: left half opaque red, right half fully transparent red (must become white)."""
    im = Image.new("RGBA", (16, 8), (255, 0, 0, 255))
    im.paste((255, 0, 0, 0), (8, 0, 16, 8))
    return _save(im, "PNG")


def la_png() -> bytes:
    """LA: left half opaque black, right half transparent black (must become white)."""
    im = Image.new("LA", (16, 8), (0, 255))
    im.paste((0, 0), (8, 0, 16, 8))
    return _save(im, "PNG")


def palette_transparency_png() -> bytes:
    """Palette image whose index 0 is transparent: left half index 1 (blue), right half index 0."""
    im = Image.new("P", (16, 8), 1)
    im.putpalette([0, 255, 0] + list(BLUE) + [0, 0, 0] * 254)
    im.paste(0, (8, 0, 16, 8))
    return _save(im, "PNG", transparency=0)


def cmyk_jpeg() -> bytes:
    """CMYK JPEG of pure red (C=0, M=255, Y=255, K=0)."""
    return _save(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG", quality=100)


def png16() -> bytes:
    """16-bit grayscale PNG (I;16): left half 65535 (white), right half 128*257 (mid grey 128)."""
    arr = np.full((8, 16), 65535, dtype=np.uint16)
    arr[:, 8:] = 128 * 257
    im = Image.fromarray(arr)  # uint16 -> mode I;16
    assert im.mode == "I;16", im.mode
    return _save(im, "PNG")


def exif_rotated_jpeg() -> bytes:
    """A 40x20 (WxH) JPEG, left half red and right half blue, with EXIF Orientation=6 (rotate 90 CW).

    Displayed correctly it is 20 wide and 40 high with red on top.
    """
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(im, "JPEG", quality=95, exif=exif)


def animated_gif() -> bytes:
    """Two-frame GIF: first frame red, second blue."""
    frames = [Image.new("RGB", (16, 8), RED), Image.new("RGB", (16, 8), BLUE)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def one_by_one_png() -> bytes:
    """A single red pixel."""
    return rgb_png(1, 1)


def very_wide_png() -> bytes:
    """A 4000x2 strip."""
    return rgb_png(4000, 2, BLUE)


def truncated_jpeg() -> bytes:
    """A noisy 128x128 JPEG cut to half its length: opens fine, fails on load()."""
    rng = np.random.default_rng(0)
    data = _save(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)), "JPEG", quality=90)
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    """A noisy PNG cut to half its length."""
    rng = np.random.default_rng(1)
    data = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    return data[: len(data) // 2]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A decompression bomb: the header claims width x height RGB pixels, the file is a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # A few all-zero rows in an unfinished zlib stream: nowhere near the claimed size, so a decoder that
    # got past the header would fail with "truncated" (a finished short stream Pillow would pad silently).
    packer = zlib.compressobj(9)
    idat = packer.compress(b"\x00" * (1 + 3 * width) * 4) + packer.flush(zlib.Z_SYNC_FLUSH)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def text_bytes() -> bytes:
    """Plain text, not an image."""
    return b"this is not an image, just some text\n"


def svg_bytes() -> bytes:
    """An SVG document: an image to a browser, not to Pillow."""
    return b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def random_bytes(n: int = 2048) -> bytes:
    """Deterministic random bytes."""
    return random.Random(0).randbytes(n)


# kind -> (generator, file suffix)
ODD_IMAGES = {
    "rgb_jpeg": (rgb_jpeg, ".jpg"),
    "gray_l": (gray_l_png, ".png"),
    "rgba": (rgba_png, ".png"),
    "la": (la_png, ".png"),
    "palette_transparency": (palette_transparency_png, ".png"),
    "cmyk": (cmyk_jpeg, ".jpg"),
    "png16": (png16, ".png"),
    "exif_rotated": (exif_rotated_jpeg, ".jpg"),
    "animated_gif": (animated_gif, ".gif"),
    "one_by_one": (one_by_one_png, ".png"),
    "very_wide": (very_wide_png, ".png"),
    "truncated_jpeg": (truncated_jpeg, ".jpg"),
    "truncated_png": (truncated_png, ".png"),
    "bomb_png": (bomb_png, ".png"),
    "text": (text_bytes, ".jpg"),
    "svg": (svg_bytes, ".svg"),
    "random_bytes": (random_bytes, ".png"),
}

# Kinds decode_image must accept, and kinds it must refuse.
DECODABLE = [
    "rgb_jpeg", "gray_l", "rgba", "la", "palette_transparency", "cmyk", "png16", "exif_rotated",
    "animated_gif", "one_by_one", "very_wide",
]
UNDECODABLE = ["truncated_jpeg", "truncated_png", "text", "svg", "random_bytes"]
TOO_LARGE = ["bomb_png"]


def odd_image(kind: str) -> bytes:
    """The bytes of one odd image kind."""
    return ODD_IMAGES[kind][0]()


def write_image(path: str | Path, kind: str) -> Path:
    """Write one odd image kind to path (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(odd_image(kind))
    return path


def write_solid(path: str | Path, color=RED, size: tuple[int, int] = (16, 16)) -> Path:
    """Write a small solid-colour image; the format follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path
