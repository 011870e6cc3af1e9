"""lerobot async-inference payloads (pickles) read and written without importing lerobot.

lerobot's gRPC messages carry Python pickles. `loads` never runs `pickle.loads` on them: a
restricted unpickler resolves only the globals these messages contain, each mapped to a stand-in
here or to a checked wrapper:

- `lerobot.async_inference.helpers.TimedObservation`, `RemotePolicyConfig`,
  `lerobot.configs.types.PolicyFeature`, `FeatureType`: the stand-ins below;
- `numpy._core.multiarray._reconstruct` (numpy 2) and `numpy.core.multiarray._reconstruct` (1.x):
  an ndarray rebuild whose subtype must be `numpy.ndarray`, itself a marker only `_reconstruct`
  accepts (calling it would allocate freely);
- `numpy.dtype`, `numpy.(_)core.multiarray.scalar`: numeric dtypes (bool, int, uint, float) only;
- `torch._utils._rebuild_tensor_v2`, `torch.storage._load_from_bytes`: contiguous numeric tensors,
  the storage bytes read with `torch.load(weights_only=True)`;
- `collections.OrderedDict`, `builtins.set`, `builtins.frozenset`: themselves.

Anything else is refused with `PayloadError` naming the global; nothing outside this list is
imported or called. The result is then walked (depth, size, types) before it is used.

Replies are pickled so lerobot's stock client can read them with plain `pickle.loads`: a list of
`lerobot.async_inference.helpers.TimedAction` holding 1-D float32 torch tensors.
"""

import collections
import dataclasses
import enum
import io
import math
import pickle
import sys

from typing import Any

import numpy as np

HELPERS = "lerobot.async_inference.helpers"
TYPES = "lerobot.configs.types"
MAX_DEPTH = 16
MAX_NODES = 100_000
MAX_ELEMENTS = 64 * 1024 * 1024  # per array or tensor
NUMERIC_KINDS = "biuf"


class PayloadError(ValueError):
    """A payload that is not one of lerobot's messages, or not safe to read."""


class FeatureType(str, enum.Enum):
    STATE = "STATE"
    VISUAL = "VISUAL"
    ENV = "ENV"
    ACTION = "ACTION"
    REWARD = "REWARD"
    LANGUAGE = "LANGUAGE"

    def __setstate__(self, state):  # a BUILD must never rewrite a shared enum member
        raise PayloadError("FeatureType takes no state")


class _StandIn:
    """A dataclass that pickle's BUILD fills only with its own fields."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise PayloadError(f"{type(self).__name__}: expected a field dict, got a {type(state)}")
        names = {f.name for f in dataclasses.fields(self)}
        unknown = [k for k in state if k not in names]
        if unknown:
            raise PayloadError(f"{type(self).__name__}: unknown fields {unknown}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        missing = [n for n in names if n not in state and defaults[n] is dataclasses.MISSING]
        if missing:
            raise PayloadError(f"{type(self).__name__}: missing fields {sorted(missing)}")
        self.__dict__.update({**{k: v for k, v in defaults.items() if k not in state}, **state})


@dataclasses.dataclass
class PolicyFeature(_StandIn):
    type: Any
    shape: Any


@dataclasses.dataclass
class TimedObservation(_StandIn):
    timestamp: Any
    timestep: Any
    observation: Any
    must_go: Any = False


@dataclasses.dataclass
class RemotePolicyConfig(_StandIn):
    policy_type: Any
    pretrained_name_or_path: Any
    lerobot_features: Any
    actions_per_chunk: Any
    device: Any = "cpu"
    rename_map: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TimedAction:
    timestamp: float
    timestep: int
    action: Any  # 1-D torch tensor


class _NdarrayMarker:
    """What `numpy.ndarray` resolves to: accepted by `_reconstruct` only."""


NDARRAY = _NdarrayMarker()


def _dtype(name, align=False, copy=True):
    if not isinstance(name, str) or align not in (0, 1) or copy not in (0, 1):
        raise PayloadError(f"numpy.dtype: unexpected arguments {name!r}, {align!r}, {copy!r}")
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise PayloadError(f"numpy.dtype: unknown dtype {name!r}") from None
    if dtype.kind not in NUMERIC_KINDS:
        raise PayloadError(f"numpy.dtype: {name!r} refused (bool, int, uint or float only)")
    return np.dtype(name, bool(align), True)  # a copy: BUILD must not touch numpy's own dtypes


def _reconstruct(subtype, shape, dtype):
    if subtype is not NDARRAY or shape != (0,) or dtype != b"b":
        raise PayloadError("numpy _reconstruct: only a plain numpy.ndarray may be rebuilt")
    return np.ndarray((0,), np.uint8)  # BUILD (ndarray.__setstate__) sets dtype, shape, data


def _scalar(dtype, data):
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS:
        raise PayloadError("numpy scalar: numeric dtypes only")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise PayloadError("numpy scalar: data does not match its dtype")
    return np.frombuffer(data, dtype)[0].copy()


def _load_storage(data):
    import torch

    if not isinstance(data, bytes) or len(data) > 8 * MAX_ELEMENTS:
        raise PayloadError("torch storage: expected bytes of bounded size")
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise PayloadError(f"torch storage: {type(e).__name__}: {e}") from None


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
    import torch

    numel = math.prod(size) if isinstance(size, tuple) else -1
    contiguous = tuple(math.prod(size[i + 1 :]) for i in range(len(size))) if numel >= 0 else ()
    ok = (
        isinstance(storage, torch.storage.TypedStorage)
        and not storage.dtype.is_complex
        and offset == 0
        and all(isinstance(n, int) and n >= 0 for n in size)
        and stride == contiguous
        and numel <= min(storage._size(), MAX_ELEMENTS)  # _size: size() warns (deprecated)
        and not rest
    )
    if not ok:
        raise PayloadError("torch tensor: only contiguous numeric tensors within their storage")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, hooks or {})


_ALLOWED = {
    (HELPERS, "TimedObservation"): TimedObservation,
    (HELPERS, "RemotePolicyConfig"): RemotePolicyConfig,
    (TYPES, "PolicyFeature"): PolicyFeature,
    (TYPES, "FeatureType"): FeatureType,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler: it reads counted bytes as they come, where the C one allocates
    the declared length first (a 20-byte pickle could ask for terabytes)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise PayloadError(f"pickled global {module}.{name} is not allowed") from None

    def persistent_load(self, pid):
        raise PayloadError("persistent ids are not allowed")

    def load_build(self):
        """BUILD only on the objects these messages build: arrays, dtypes, the stand-ins (never
        on a class or a shared object, whose attributes it would rewrite for every later call)."""
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(target, (np.ndarray, np.dtype, _StandIn)):
            raise PayloadError(f"BUILD on a {type(target).__name__} is not allowed")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def loads(data: bytes, expected: type):
    """Read one lerobot message (`TimedObservation` or `RemotePolicyConfig`) from pickle bytes."""
    try:
        value = _Unpickler(io.BytesIO(data)).load()
    except PayloadError:
        raise
    except Exception as e:  # truncated, malformed, a wrapper's own check, MemoryError...
        raise PayloadError(
            f"not a readable {expected.__name__} pickle: {type(e).__name__}"
        ) from None
    if type(value) is not expected:
        raise PayloadError(f"expected a {expected.__name__}, got {type(value).__name__}")
    check_tree(value)
    return value


_LEAVES = (str, bytes, int, float, bool, type(None), FeatureType)
_CONTAINERS = (dict, list, tuple, set, frozenset)


def check_tree(value) -> None:
    """Walk a decoded payload without recursion: bounded depth and size, known types only."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH or nodes > MAX_NODES:
            raise PayloadError(f"payload nested deeper than {MAX_DEPTH} or larger than {MAX_NODES}")
        if isinstance(item, _LEAVES) and not isinstance(item, _CONTAINERS):
            continue
        if isinstance(item, (np.ndarray, np.generic)):
            if item.dtype.kind not in NUMERIC_KINDS or item.dtype.fields is not None:
                raise PayloadError(f"array of dtype {item.dtype} refused (numeric only)")
            continue
        if _is_tensor(item):
            continue
        if isinstance(item, _CONTAINERS):
            children = item.items() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, _StandIn):
            stack.extend((v, depth + 1) for v in item.__dict__.values())
        else:
            raise PayloadError(f"unexpected {type(item).__name__} in the payload")


def _is_tensor(item) -> bool:
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    return torch is not None and isinstance(item, torch.Tensor)


# ---------------------------------------------------------------- replies


def dumps_actions(actions: list) -> bytes:
    """list[TimedAction] -> the pickle lerobot's RobotClient reads.

    The C pickler writes our stand-in, then its class path is swapped for lerobot's: protocol 3
    names a class with one text GLOBAL opcode (`c<module>\\n<name>\\n`) and has no frame lengths,
    and the class comes first (before any tensor bytes), written once (later uses are memo
    references). ~5x faster than a pure-Python pickler that writes the name itself."""
    data = pickle.dumps(list(actions), protocol=3)
    ours = f"c{TimedAction.__module__}\nTimedAction\n".encode()
    head, found, tail = data.partition(ours)
    if actions and (not found or len(head) > 16):
        raise RuntimeError("unexpected pickle layout for TimedAction")
    return head + f"c{HELPERS}\nTimedAction\n".encode() + tail if found else data
