"""Decode a path or bytes into an RGB uint8 array: the one decoder for training, evaluation and serving.

Handles every Pillow mode a user is likely to upload (grayscale, alpha, palette, CMYK, 16-bit, float),
applies EXIF orientation, takes the first frame of animations, and refuses decompression bombs
before a single pixel is decoded.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from raytimm.errors import ImageError, ImageTooLargeError

DEFAULT_MAX_PIXELS = 64_000_000

# Our own pixel limit (checked right after Image.open, before any pixel is decoded) is the authority.
# Pillow's global check would otherwise warn above ~89 MP and refuse above ~179 MP whatever limit the
# user configured, so it is switched off here; every untrusted image in raytimm comes through
# decode_image. (warnings.catch_warnings per call is not an option: it is not thread-safe for Serve.)
Image.MAX_IMAGE_PIXELS = None

# A truncated file must fail loudly, never decode as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255, 255)


def decode_image(
    src: str | os.PathLike | bytes,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Decode an image file or bytes into an HxWx3 uint8 RGB array (raises ImageError / ImageTooLargeError)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = name or "upload"
        fp = io.BytesIO(bytes(src))
    else:
        label = name or os.fspath(src)
        fp = os.fspath(src)
    with pillow_errors(label), Image.open(fp) as im:
        check_pixel_limit(im.size, max_pixels, label)
        # load() is where truncated or corrupt data surfaces; it must stay inside pillow_errors.
        im.load()
        im = _apply_exif_orientation(im)
        return to_rgb_array(im, label)


@contextlib.contextmanager
def pillow_errors(label: str) -> Iterator[None]:
    """Turn whatever opening or decoding an image raises into ImageError / ImageTooLargeError naming label.

    The one translation of Pillow's failures: decode_image and the dataset scan's cheaper verify
    (folder.verify_image_file) both run inside it, so a bad file reads the same everywhere.
    """
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{label}: image is too large to decode ({exc})") from None
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image file") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{label}: not a recognised image format") from None
    except MemoryError:
        raise ImageTooLargeError(f"{label}: not enough memory to decode this image") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, struct.error...) on bad data
        raise ImageError(f"{label}: cannot decode image, file is truncated or corrupt ({_short(exc)})") from None


def check_pixel_limit(size: tuple[int, int], max_pixels: int | None, label: str) -> None:
    """Raise ImageTooLargeError when width*height exceeds max_pixels (None or <= 0 disables the limit)."""
    width, height = size
    if max_pixels and max_pixels > 0 and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{label}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} pixels"
        )


def to_rgb_array(im: Image.Image, label: str = "image") -> np.ndarray:
    """Convert a loaded Pillow image of any mode into an HxWx3 uint8 RGB array."""
    mode = im.mode
    if mode == "RGB":
        rgb = im
    elif (mode == "P" and "transparency" in im.info) or mode in _ALPHA_MODES:
        rgb = _composite_on_white(im)
    elif mode.startswith("I;16") or mode == "I":
        rgb = _gray_array_to_rgb(_scale_int_to_uint8(np.asarray(im)))
    elif mode == "F":
        rgb = _gray_array_to_rgb(_scale_float_to_uint8(np.asarray(im)))
    else:
        # L, 1, P, CMYK, YCbCr, HSV, LAB...: Pillow's own conversion is right for these.
        try:
            rgb = im.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ImageError(f"{label}: unsupported image mode {mode!r} ({_short(exc)})") from None
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"{label}: decoded to unexpected shape {arr.shape} from mode {mode!r}")
    # Pillow can hand out read-only views; augmentations write in place.
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr, dtype=np.uint8, order="C")


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag; a corrupt EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - broken EXIF metadata must not make valid pixels unreadable
        return im


def _composite_on_white(im: Image.Image) -> Image.Image:
    """Flatten an image with transparency onto a white background."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_int_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale 16-bit (or 32-bit 'I') integer pixels to 0..255.

    I;16 is always 16-bit. Mode 'I' carries no bit depth, so its value range decides: values that fit
    in 8 bits are kept, values that fit in 16 bits are scaled by 257, anything else is min-max scaled.
    """
    values = arr.astype(np.int64)
    lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
    if arr.dtype.itemsize == 2 or (lo >= 0 and hi > 255 and hi <= 65535):
        # 65535 / 257 == 255 exactly; +128 rounds to nearest.
        return ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return values.astype(np.uint8)
    return _minmax_to_uint8(values.astype(np.float64))


def _scale_float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale float pixels: values within [0, 1] are fractions of white, other ranges are min-max scaled."""
    values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        return np.round(values * 255.0).astype(np.uint8)
    return _minmax_to_uint8(values)


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _gray_array_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _short(exc: BaseException) -> str:
    """One line describing an exception, for error messages."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
