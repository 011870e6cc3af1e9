"""The op layer: every matmul, attention, norm and activation of the model goes through an `Ops` table.

Each op has a native (torch) implementation that is also the executable spec and the test oracle.
A backend (FlagGems) may replace some ops; the route of every op is chosen once, when the table is
built, and logged. Model code calls `ops.linear(...)` etc. and never branches on the backend.
"""

import os

from dataclasses import dataclass, field
from typing import Callable, Dict

from flagscale.ops import native

OP_NAMES = ("linear", "rms_norm", "layer_norm", "gelu_tanh", "geglu", "silu", "attention")

_TRUE = ("1", "true", "yes", "on")


def flaggems_requested(env=None) -> bool:
    """FlagScale's convention: USE_FLAGGEMS in {1, true, yes} (case-insensitive) turns FlagGems on."""
    env = os.environ if env is None else env
    return str(env.get("USE_FLAGGEMS", "false")).strip().lower() in _TRUE


@dataclass
class Ops:
    """A table of op implementations plus where each one is routed."""

    backend: str
    routes: Dict[str, str]
    impls: Dict[str, Callable] = field(repr=False)

    def __post_init__(self):
        for name in OP_NAMES:
            setattr(self, name, self.impls[name])

    def describe(self) -> str:
        return ", ".join(f"{name}={self.routes[name]}" for name in OP_NAMES)


def native_ops() -> Ops:
    impls = {name: getattr(native, name) for name in OP_NAMES}
    return Ops("native", {name: "native" for name in OP_NAMES}, impls)


def build_ops(backend: str = "native", **kwargs) -> Ops:
    """Build the op table for `backend` ("native" or "flaggems")."""
    backend = (backend or "native").lower()
    if backend == "native":
        return native_ops()
    if backend == "flaggems":
        from flagscale.ops.flaggems import flaggems_ops

        return flaggems_ops(**kwargs)
    raise ValueError(f"unknown op backend {backend!r}; choose 'native' or 'flaggems'")
