"""base64 image text -> uint8 (H, W, 3) RGB arrays; sizes are checked before pixels are decoded."""

import base64
import binascii
import io
import os
import re
import threading
import warnings

from concurrent.futures import ThreadPoolExecutor
from typing import List, Sequence, Union

import numpy as np

from PIL import Image

try:  # libjpeg-turbo straight into numpy: the same pixels as PIL's JPEG decoder, ~2x faster
    import simplejpeg
except ImportError:  # optional: PIL then decodes JPEGs too
    simplejpeg = None

# Decoders we accept; exotic formats are refused rather than parsed.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_DATA_URL = re.compile(r"^data:([\w.+/-]*)(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class ImageDecodeError(ValueError):
    """The image text is not valid base64, not a supported image, truncated or too large."""


def decode_image(text: str, max_side: int = 4096) -> np.ndarray:
    """Decode base64 image text (an optional `data:image/...;base64,` prefix is allowed).

    The image header is checked first: a side above max_side is refused before decoding pixels.
    """
    raw = decode_base64(text)
    fast = _decode_jpeg_fast(raw, max_side)
    if fast is not None:
        return fast
    with _open(raw) as img:
        _check_size(img, max_side)
        rgb = _load_rgb(img)
    return np.array(rgb, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def decode_images(texts: Sequence[str], max_side: int = 4096) -> List[Union[np.ndarray, Exception]]:
    """decode_image for several images at once: the first in this thread, the others on a shared
    thread pool (the decoders release the GIL: three 640x480 JPEGs take about one image's time).
    Failures come back in place, as the ImageDecodeError, so the caller can name the camera."""
    global _POOL
    if len(texts) < 2:
        return [_decode_or_error(text, max_side) for text in texts]
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="decode")
    rest = [_POOL.submit(_decode_or_error, text, max_side) for text in texts[1:]]
    return [_decode_or_error(texts[0], max_side)] + [f.result() for f in rest]


def _decode_or_error(text: str, max_side: int):
    try:
        return decode_image(text, max_side)
    except ImageDecodeError as e:
        return e


def _decode_jpeg_fast(raw: bytes, max_side: int) -> Union[np.ndarray, None]:
    """A baseline/progressive YCbCr or grayscale JPEG within max_side, decoded by simplejpeg
    (same libjpeg-turbo, IDCT and upsampling as Pillow: identical pixels, tested). None for
    anything else, and on any decoder complaint (strict): the PIL path then decodes the image or
    words the error."""
    if simplejpeg is None or raw[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
        too_large = max(width, height) > max_side or width * height > Image.MAX_IMAGE_PIXELS
        if colorspace not in ("YCbCr", "Gray") or too_large:
            return None
        return simplejpeg.decode_jpeg(raw, colorspace="RGB", strict=True)
    except ValueError:
        return None


def decode_base64(text: str) -> bytes:
    if not isinstance(text, str):
        raise ImageDecodeError(f"expected base64 text, got {type(text).__name__}")
    match = _DATA_URL.match(text)
    if match:
        if match.group(1) and not match.group(1).lower().startswith("image/"):
            raise ImageDecodeError(f"data URL media type must be image/*, got {match.group(1)!r}")
        text = text[match.end() :]
    if not text.strip():
        raise ImageDecodeError("empty image data")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass  # maybe line-wrapped base64: strip whitespace (slow path) and retry
    try:
        return base64.b64decode(_WHITESPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageDecodeError(f"invalid base64: {e}") from None


def encode_image(image, fmt: str = "JPEG", quality: int = 90) -> str:
    """uint8 (H, W, 3) array or PIL image -> base64 text (no data: prefix), as v1 clients send."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8), mode="RGB")
    options = {"quality": quality} if fmt == "JPEG" else {}
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _open(raw: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image too large: {e}") from None
    except Image.UnidentifiedImageError:
        kinds = ", ".join(IMAGE_FORMATS)
        raise ImageDecodeError(
            f"not a recognised image (supported: {kinds}), or its header is truncated"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"image header is truncated or corrupt: {e}") from None


def _check_size(img: Image.Image, max_side: int) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if width > max_side or height > max_side:
        raise ImageDecodeError(
            f"image is {width}x{height}; each side must be at most {max_side} "
            "(engine.max_image_side)"
        )


def _load_rgb(img: Image.Image) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image data is truncated or corrupt: {e}") from None
