"""base64 image text -> uint8 (H, W, 3) RGB arrays; sizes are checked before pixels are decoded."""

import base64
import binascii
import dataclasses
import io
import os
import re
import threading
import warnings

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from PIL import Image

try:  # libjpeg-turbo straight into numpy: the same pixels as PIL's JPEG decoder, ~2x faster
    import simplejpeg
except ImportError:  # optional: PIL then decodes JPEGs too
    simplejpeg = None

try:  # SIMD base64: ~30x faster than the standard library on camera images, same bytes
    import pybase64
except ImportError:  # optional: the standard library decodes the same
    pybase64 = None

# Decoders we accept; exotic formats are refused rather than parsed.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_DATA_URL = re.compile(r"^data:([\w.+/-]*)(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class ImageDecodeError(ValueError):
    """The image text is not valid base64, not a supported image, truncated or too large."""


# Images with a longer side above this are reduced (uint8 box filter, by the smallest integer
# factor that brings them within it) right after decoding, so that what waits in the queue and
# what the policy converts to float stays small. Camera frames up to 2048 px reach the policy
# unchanged (the same pixels as the float reference resize sees).
REDUCE_ABOVE_SIDE = 2048


class PixelBudget:
    """The pixels one request may decode (engine.max_request_pixels), charged from each image's
    header before its pixels are decoded: a few KB of lossless WebP can hold 16 M pixels.
    Thread-safe."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def charge(self, width: int, height: int) -> None:
        with self._lock:
            self.used += width * height
            if self.used > self.limit:
                raise ImageDecodeError(
                    f"the request's images hold more than {self.limit} pixels in all "
                    "(engine.max_request_pixels); send smaller images"
                )


def _charge(budget: "PixelBudget | None", width: int, height: int) -> None:
    if budget is not None:
        budget.charge(width, height)


# Pixel decoding (the costly part) runs in at most this many threads at once, whichever request
# threads ask for it (engine.decode_threads).
_SLOTS = {"decode": threading.BoundedSemaphore(min(4, os.cpu_count() or 1))}


def set_decode_threads(count: int) -> None:
    _SLOTS["decode"] = threading.BoundedSemaphore(count)


def decode_image(text: str, max_side: int = 4096, budget: PixelBudget | None = None) -> np.ndarray:
    """Decode base64 image text (an optional `data:image/...;base64,` prefix is allowed).

    The image header is checked first: a side above max_side, or more pixels than the request's
    budget has left, is refused before decoding pixels.
    """
    return decode_raw(decode_base64(text), max_side, budget)


def decode_raw(raw: bytes, max_side: int = 4096, budget: PixelBudget | None = None) -> np.ndarray:
    """decode_image after base64: image file bytes -> uint8 (H, W, 3) RGB, reduced when a side is
    above REDUCE_ABOVE_SIDE."""
    size = _jpeg_size(raw, max_side) if simplejpeg is not None else None
    if size is not None:
        _charge(budget, size[1], size[0])
        with _SLOTS["decode"]:
            fast = _decode_jpeg_strict(raw)
            if fast is not None:
                return reduce_large(fast)
    with _open(raw) as img:
        _check_size(img, max_side)
        if size is None:  # not charged above
            _charge(budget, *img.size)
        with _SLOTS["decode"]:
            rgb = _reduce(_load_rgb(img))
            return np.array(rgb, dtype=np.uint8)  # writable (torch warns on read-only arrays)


def reduce_large(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> the same, box-reduced when a side is above REDUCE_ABOVE_SIDE."""
    if max(image.shape[:2]) <= REDUCE_ABOVE_SIDE:
        return image
    return np.array(_reduce(Image.fromarray(image)), dtype=np.uint8)


def _reduce(img: Image.Image) -> Image.Image:
    factor = -(-max(img.size) // REDUCE_ABOVE_SIDE)  # ceil
    return img.reduce(factor) if factor > 1 else img


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def decode_images(
    texts: Sequence[str], max_side: int = 4096, budget: PixelBudget | None = None
) -> List[Union[np.ndarray, Exception]]:
    """decode_image for several images at once: the first in this thread, the others on a shared
    thread pool (the decoders release the GIL: three 640x480 JPEGs take about one image's time).
    Failures come back in place, as the ImageDecodeError, so the caller can name the camera."""
    global _POOL
    if len(texts) < 2:
        return [_or_error(decode_image, text, max_side, budget) for text in texts]
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="decode")
    rest = [_POOL.submit(_or_error, decode_image, text, max_side, budget) for text in texts[1:]]
    return [_or_error(decode_image, texts[0], max_side, budget)] + [f.result() for f in rest]


def _or_error(decode, data, max_side: int, budget=None):
    """decode(data, max_side, budget), or the ImageDecodeError it raised (returned in place)."""
    try:
        return decode(data, max_side, budget)
    except ImageDecodeError as e:
        return e


@dataclasses.dataclass
class Codecs:
    """A request's decoders. In the request threads: `images` (base64 text -> pixels; with the GPU
    decoder, only the JPEG headers) and `prompts` (tokenize and cache new prompts: the policy's
    `warm_prompts`, once it is loaded). In the inference thread: `frames` (a batch's deferred
    JPEGs -> pixels; the GPU decoder only)."""

    images: Callable = decode_images
    frames: Optional[Callable[[list], list]] = None
    prompts: Optional[Callable[[Sequence[str]], None]] = None

    def warm_prompts(self, prompts: Sequence[str]) -> None:
        """Tokenize new prompts here (a request thread), not in the inference thread."""
        if self.prompts is not None:
            self.prompts(prompts)


@dataclasses.dataclass(frozen=True)
class EncodedJpeg:
    """A camera image left encoded by the request thread (header checked), for `GpuJpegDecoder`
    to decode in the inference thread."""

    raw: bytes
    height: int
    width: int


class GpuJpegDecoder:
    """JPEGs decoded on a CUDA GPU by nvJPEG (torchvision; the GPU's hardware JPEG engines where
    it has them, as on A100 and H100). Opt-in (`engine.image_decoder: gpu`): nvJPEG's chroma
    upsampling and IDCT are not libjpeg-turbo's, so some values differ from Pillow's by a few
    levels (docs/benchmarks.md), unlike the CPU path, which matches Pillow exactly.

    nvJPEG does not check the entropy-coded data: a JPEG damaged inside (bits changed, length and
    markers intact) is decoded to wrong pixels (parts of the frame may keep the memory held
    before) instead of refused, unlike on the CPU path.

    Two halves, because nvJPEG synchronises the device (a decode waits for a running model):
    `__call__` (request thread, like `decode_images`) checks base64 and headers and keeps
    decodable JPEGs as `EncodedJpeg`; other formats are decoded on the CPU there, errors come
    back in place. `decode_frames` (inference thread, before the model call) decodes a batch's
    JPEGs in one call into uint8 (H, W, 3) CUDA tensors; a JPEG nvJPEG refuses goes to the CPU
    decoder, which words the error. `decode_jpeg` is torchvision's (tests pass a stand-in)."""

    def __init__(self, device="cuda", decode_jpeg=None):
        import torch

        self.device = torch.device(device)
        self._decode_jpeg = decode_jpeg or _torchvision_decode_jpeg()
        probe = base64.b64decode(encode_image(np.full((16, 16, 3), 128, np.uint8)))
        try:  # fail at start-up, not on the first request
            self._decode_jpeg([torch.frombuffer(bytearray(probe), dtype=torch.uint8)], self.device)
        except Exception as e:
            raise RuntimeError(f"GPU JPEG decoding does not work here: {e}") from e

    def __call__(self, texts: Sequence[str], max_side: int = 4096, budget=None) -> list:
        out: list = []
        for text in texts:
            try:
                raw = decode_base64(text)
                out.append(self._encoded_or_pixels(raw, max_side, budget))
            except ImageDecodeError as e:
                out.append(e)
        return out

    def _encoded_or_pixels(self, raw: bytes, max_side: int, budget) -> object:
        size = _jpeg_size(raw, max_side)
        # nvJPEG reports no error for a truncated JPEG and leaves the rest of the frame as the
        # memory held before (measured): only JPEGs that end with their end-of-image marker go
        # to it; the CPU decoder refuses the others (or decodes them)
        if size and raw.endswith(b"\xff\xd9"):
            _charge(budget, size[1], size[0])
            return EncodedJpeg(raw, *size)
        return decode_raw(raw, max_side, budget)

    def decode_frames(self, observations: Sequence[dict]) -> list:
        """Observations with every EncodedJpeg image replaced by its pixels (CUDA tensors)."""
        import torch

        images = [o.get("images") or {} for o in observations]
        todo = [
            (i, k)
            for i, ims in enumerate(images)
            for k, v in ims.items()
            if isinstance(v, EncodedJpeg)
        ]
        if not todo:
            return list(observations)
        raws = [images[i][k].raw for i, k in todo]
        try:
            data = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw in raws]
            frames = [f.permute(1, 2, 0) for f in self._decode_jpeg(data, self.device)]
        except Exception:  # corrupt data or an unsupported JPEG: the CPU decides (or raises)
            frames = [_decode_cpu(raw, key) for raw, (_, key) in zip(raws, todo)]
        out = [dict(o, images=dict(ims)) for o, ims in zip(observations, images)]
        for (i, key), frame in zip(todo, frames):
            out[i]["images"][key] = frame
        return out


def _decode_cpu(raw: bytes, key: str) -> np.ndarray:
    try:
        return decode_raw(raw)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{key}: {e}") from None


def _torchvision_decode_jpeg():
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as e:  # ImportError, or torchvision built for another torch
        raise RuntimeError(
            f"GPU JPEG decoding needs torchvision with nvJPEG (a CUDA build): {e}"
        ) from e
    return lambda data, device: decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _jpeg_size(raw: bytes, max_side: int) -> Union[tuple, None]:
    """(height, width) of a YCbCr or grayscale JPEG within max_side and Pillow's pixel limit
    (from the header: simplejpeg's, else Pillow's), else None."""
    if raw[:3] != b"\xff\xd8\xff":
        return None
    try:
        if simplejpeg is not None:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
            supported = colorspace in ("YCbCr", "Gray")
        else:
            with _open(raw) as img:
                width, height = img.size
                supported = img.format == "JPEG" and img.mode in ("RGB", "L")
    except (ValueError, ImageDecodeError):
        return None
    too_large = max(width, height) > max_side or width * height > Image.MAX_IMAGE_PIXELS
    return (height, width) if supported and min(width, height) > 0 and not too_large else None


def _decode_jpeg_strict(raw: bytes) -> Union[np.ndarray, None]:
    """A JPEG `_jpeg_size` accepted, decoded by simplejpeg (same libjpeg-turbo, IDCT and
    upsampling as Pillow: identical pixels, tested). None on any decoder complaint (strict): the
    PIL path then decodes the image or words the error."""
    try:
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
    if pybase64 is not None:
        try:
            return pybase64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            pass  # the standard library decides (and words the error) below
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
