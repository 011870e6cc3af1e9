"""The op layer: every matmul, attention, norm, RoPE and activation of the model goes through an
`Ops` table.

Each op has a native (torch) implementation that is also the executable spec and the test oracle.
A backend (FlagGems) may replace some ops; the route of every op is chosen once, when the table is
built, and logged. Model code calls `ops.linear(...)` etc. and never branches on the backend.
"""

import os

from dataclasses import dataclass, field
from typing import Callable, Dict

from flagscale.ops import native
from flagscale.ops.composite import COMPOSITE_NAMES, compose

OP_NAMES = (
    "linear",
    "rms_norm",
    "ada_rms_norm",
    "layer_norm",
    "rope",
    "gelu_tanh",
    "geglu",
    "silu",
    "attention",
)

TRUE_STRINGS = ("1", "true", "yes", "on")


def flaggems_requested(env=None) -> bool:
    """FlagScale's convention: USE_FLAGGEMS in {1, true, yes} (case-insensitive) turns FlagGems on."""
    env = os.environ if env is None else env
    return str(env.get("USE_FLAGGEMS", "false")).strip().lower() in TRUE_STRINGS


@dataclass
class Ops:
    """A table of op implementations plus where each one is routed.

    Besides the primitives (OP_NAMES) it offers the composites of `composite.py`, built from its
    own primitives; `fused` may replace composites (and attention) with fused kernels.
    """

    backend: str
    routes: Dict[str, str]
    impls: Dict[str, Callable] = field(repr=False)
    fused: Dict[str, Callable] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name in OP_NAMES:
            setattr(self, name, self.impls[name])
        self.composed = compose(self)
        for name in COMPOSITE_NAMES:
            setattr(self, name, self.composed[name])
        for name, fn in self.fused.items():
            setattr(self, name, fn)

    def describe(self) -> str:
        text = ", ".join(f"{name}={self.routes[name]}" for name in OP_NAMES)
        if self.fused:
            text += f"; fused Triton kernels: {', '.join(self.fused)}"
        return text

    def with_fused_kernels(self, persistent_layers: bool = True) -> "Ops":
        """This table plus the fused Triton kernels (CUDA): each replaces a composite (or
        attention) for the shapes it covers and falls back to it elsewhere. With a backend other
        than native, only the action expert's short inputs take them; long (prefix) inputs keep
        the backend's own ops instead of the cuBLAS-based long path. `persistent_layers` adds
        `decoder_layer`: a whole expert layer (short inputs) in one persistent launch."""
        try:
            from flagscale.ops import triton_fused
        except ImportError as err:
            raise RuntimeError(f"fused kernels need Triton (pip install triton): {err}") from err
        fused = triton_fused.dispatchers(self, persistent_layers)
        return Ops(self.backend, dict(self.routes), self.impls, fused)

    def with_fp8(self) -> "Ops":
        """This table with `linear` taking the FP8 GEMM (`fp8.linear`) for long inputs whose
        weight carries an e4m3 copy (`fp8.enable`); everything else as before."""
        from flagscale.ops import fp8

        base = self.linear

        def linear(x, weight, bias=None):
            if fp8.has_fp8(weight) and x.numel() // x.shape[-1] >= fp8.MIN_ROWS:
                return fp8.linear(x, weight, bias)
            return base(x, weight, bias)

        return Ops(self.backend, dict(self.routes), self.impls, {**self.fused, "linear": linear})


def native_ops() -> Ops:
    impls = {name: getattr(native, name) for name in OP_NAMES}
    return Ops("native", {name: "native" for name in OP_NAMES}, impls)


def resolve_backend(backend: str = "auto", env=None) -> str:
    """Backend "auto" (or None): "flaggems" when USE_FLAGGEMS is on, else "native"; others as given."""
    backend = (backend or "auto").lower()
    if backend == "auto":
        return "flaggems" if flaggems_requested(env) else "native"
    return backend


def build_ops(backend: str = "native", **kwargs) -> Ops:
    """Build the op table for `backend` ("native", "flaggems" or "auto": USE_FLAGGEMS decides).

    FlagGems kwargs (flagscale.ops.flaggems.flaggems_ops): routes={"linear": "native", ...} keeps
    chosen ops native; cache_dir sets FLAGGEMS_CACHE_DIR before flag_gems is imported.
    """
    backend = resolve_backend(backend or "native")
    if backend == "native":
        return native_ops()
    if backend == "flaggems":
        from flagscale.ops.flaggems import flaggems_ops

        return flaggems_ops(**kwargs)
    raise ValueError(f"unknown op backend {backend!r}; choose 'native', 'flaggems' or 'auto'")
