"""openpi's msgpack-numpy wire format, decoded without pickle.

Arrays travel as {b"__ndarray__": True, b"data": bytes, b"dtype": "<f4", b"shape": [...]}, numpy
scalars as {b"__npgeneric__": True, b"data": value, b"dtype": "<f4"}. Only bool, integer, unsigned
and float dtypes are accepted: object, void (structured), complex, string and datetime dtypes are
refused, so a request can never make the server unpickle or build arbitrary objects.
"""

import msgpack
import numpy as np

ALLOWED_KINDS = ("b", "i", "u", "f")
MAX_DIMS = 8


class PayloadError(ValueError):
    """The message is not valid msgpack-numpy, or holds a refused dtype or a bad shape."""


def _dtype(raw) -> np.dtype:
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    if not isinstance(text, str) or len(text) > 8:
        raise PayloadError(f"array dtype must be a short dtype string, got {raw!r}")
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise PayloadError(f"unknown array dtype {text!r}") from None
    if dtype.kind not in ALLOWED_KINDS or dtype.hasobject or dtype.fields is not None:
        raise PayloadError(f"array dtype {text!r} is not allowed (bool, int, uint or float only)")
    return dtype


def _shape(raw) -> tuple:
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_DIMS:
        raise PayloadError(f"array shape must be a list of at most {MAX_DIMS} sizes, got {raw!r}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in raw):
        raise PayloadError(f"array shape must hold non-negative integers, got {raw!r}")
    return tuple(raw)


def _array(obj: dict) -> np.ndarray:
    dtype, shape, data = _dtype(obj.get(b"dtype")), _shape(obj.get(b"shape")), obj.get(b"data")
    if not isinstance(data, bytes):
        raise PayloadError("array data must be bytes")
    if len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise PayloadError(f"array data has {len(data)} bytes; shape {list(shape)} needs more")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _generic(obj: dict):
    dtype, value = _dtype(obj.get(b"dtype")), obj.get(b"data")
    if not isinstance(value, (bool, int, float)):
        raise PayloadError("numpy scalar data must be a number")
    return dtype.type(value)


def _object_hook(obj: dict):
    if b"__ndarray__" in obj:
        return _array(obj)
    if b"__npgeneric__" in obj:
        return _generic(obj)
    return obj


def unpackb(data: bytes, max_bytes: int):
    """Decode one message; PayloadError on anything malformed or not allowed."""
    if len(data) > max_bytes:
        raise PayloadError(f"message is {len(data)} bytes; the limit is {max_bytes}")
    try:
        return msgpack.unpackb(data, object_hook=_object_hook, raw=False, strict_map_key=False)
    except PayloadError:
        raise
    except (
        ValueError,
        TypeError,
        OverflowError,  # a numpy scalar or shape out of its dtype's range
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as e:
        raise PayloadError(f"invalid msgpack message: {type(e).__name__}: {e}") from None


def _default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in ALLOWED_KINDS:
            raise TypeError(f"cannot send dtype {obj.dtype}")
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": obj.shape,
        }
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def packb(obj) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)
