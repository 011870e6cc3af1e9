"""The op layer: every matmul, attention, norm, RoPE and activation of the model goes through an
`Ops` table.

Each op has a native (torch) implementation that is also the executable spec and the test oracle.
A backend (FlagGems) may replace some ops; fused Triton kernels may replace the composites. Every
choice is made once, in `build_ops`, and logged; model code calls `ops.linear(...)` etc. and
never branches on the backend. This module imports no torch: the server's config parser asks
`flaggems_requested` without loading it.
"""

import os

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

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
FLAGGEMS_ENV = "USE_FLAGGEMS"


def is_true(value) -> bool:
    """The one reading of a "true" string (env vars, switches): 1, true, yes, on; any case."""
    return str(value).strip().lower() in TRUE_STRINGS


def flaggems_setting(env=None) -> Optional[str]:
    """USE_FLAGGEMS as written in `env` (default os.environ), or None. The only reader of it."""
    env = os.environ if env is None else env
    return env.get(FLAGGEMS_ENV)


def flaggems_requested(env=None) -> bool:
    """FlagScale's convention: USE_FLAGGEMS in {1, true, yes, on} (any case) turns FlagGems on."""
    return is_true(flaggems_setting(env))


def _op():
    return field(repr=False)


@dataclass
class Ops:
    """The op table: one implementation per op, chosen when the table is built.

    `routes` says in words where each primitive goes. The composites are `composite.py`'s, built
    from this table's primitives, unless a fused kernel replaces them (`fused` names those).
    `decoder_layer` is a whole (non-adaptive) expert layer in one launch, or None; the kernel
    itself returns None for shapes it does not cover.
    """

    backend: str
    routes: Dict[str, str]
    # primitives (OP_NAMES)
    linear: Callable = _op()
    rms_norm: Callable = _op()
    ada_rms_norm: Callable = _op()
    layer_norm: Callable = _op()
    rope: Callable = _op()
    gelu_tanh: Callable = _op()
    geglu: Callable = _op()
    silu: Callable = _op()
    attention: Callable = _op()
    # composites (COMPOSITE_NAMES)
    qkv_rope: Callable = _op()
    norm_geglu: Callable = _op()
    linear_residual: Callable = _op()
    add_layer_norm: Callable = _op()
    linear_gelu: Callable = _op()
    ada_qkv_rope: Callable = _op()
    ada_norm_geglu: Callable = _op()
    linear_gated_residual: Callable = _op()
    decoder_layer: Optional[Callable] = field(default=None, repr=False)
    # the backend's primitives, the composites built from this table's primitives (the fused
    # kernels' fallback and reference) and the fused replacements, by name
    impls: Dict[str, Callable] = field(default_factory=dict, repr=False)
    composed: Dict[str, Callable] = field(default_factory=dict, repr=False)
    fused: Dict[str, Callable] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        text = ", ".join(f"{name}={self.routes[name]}" for name in OP_NAMES)
        if self.fused:
            text += f"; fused Triton kernels: {', '.join(self.fused)}"
        return text

    def with_fused_kernels(self, persistent_layers: bool = True, adaptive: bool = False) -> "Ops":
        """This table plus the fused Triton kernels (CUDA): each replaces a composite (or
        attention) for the shapes it covers and falls back to it elsewhere (`fused_routes`).
        `persistent_layers` adds `decoder_layer`: a whole expert layer (short inputs) in one
        persistent launch. `adaptive` adds Pi0.5's adaptive ops (`fused_routes.ADAPTIVE`)."""
        try:
            from flagscale.ops import fused_routes
        except ImportError as err:
            raise RuntimeError(f"fused kernels need Triton (pip install triton): {err}") from err
        fused = fused_routes.dispatchers(self, persistent_layers, adaptive)
        return make_ops(self.backend, self.routes, self.impls, fused)

    def with_fp8(self) -> "Ops":
        """This table with `linear` taking the FP8 GEMM (`fp8.linear`) for long inputs whose
        weight carries an e4m3 copy (`fp8.enable`); everything else as before."""
        from flagscale.ops import fp8

        base = self.linear

        def linear(x, weight, bias=None):
            if fp8.has_fp8(weight) and x.numel() // x.shape[-1] >= fp8.MIN_ROWS:
                return fp8.linear(x, weight, bias)
            return base(x, weight, bias)

        return make_ops(self.backend, self.routes, self.impls, {**self.fused, "linear": linear})


class _Primitives:
    """What the composites call: the table's primitives (a fused replacement where there is one)."""

    def __init__(self, primitives: Dict[str, Callable]):
        self.__dict__.update(primitives)


def make_ops(
    backend: str,
    routes: Dict[str, str],
    impls: Dict[str, Callable],
    fused: Optional[Dict[str, Callable]] = None,
) -> Ops:
    """A table from a backend's primitives `impls` (one per OP_NAMES) and fused replacements."""
    fused = dict(fused or {})
    primitives = {name: fused.get(name, impls[name]) for name in OP_NAMES}
    composed = compose(_Primitives(primitives))
    composites = {name: fused.get(name, composed[name]) for name in COMPOSITE_NAMES}
    return Ops(
        backend,
        dict(routes),
        **primitives,
        **composites,
        decoder_layer=fused.get("decoder_layer"),
        impls=dict(impls),
        composed=composed,
        fused=fused,
    )


def native_ops() -> Ops:
    from flagscale.ops import native

    impls = {name: getattr(native, name) for name in OP_NAMES}
    return make_ops("native", {name: "native" for name in OP_NAMES}, impls)


def resolve_backend(backend: str = "auto", env=None) -> str:
    """Backend "auto" (or None): "flaggems" when USE_FLAGGEMS is on, else "native"; others as
    given."""
    backend = (backend or "auto").lower()
    if backend == "auto":
        return "flaggems" if flaggems_requested(env) else "native"
    return backend


def backend_ops(backend: str = "native", routes=None, cache_dir=None) -> Ops:
    """The backend's table, no fused kernels: "native", "flaggems" or "auto" (USE_FLAGGEMS).
    FlagGems: routes={"linear": "native", ...} keeps chosen ops native; cache_dir sets
    FLAGGEMS_CACHE_DIR before flag_gems is imported."""
    backend = resolve_backend(backend or "native")
    if backend == "native":
        return native_ops()
    if backend == "flaggems":
        from flagscale.ops.flaggems import flaggems_ops

        return flaggems_ops(routes=routes, cache_dir=cache_dir)
    raise ValueError(f"unknown op backend {backend!r}; choose 'native', 'flaggems' or 'auto'")


def build_ops(
    backend="native",
    device="cpu",
    fused=False,
    persistent=True,
    cache_dir=None,
    precision="bf16",
    routes=None,
) -> Ops:
    """The one place the op table is decided: the backend (a name, see `backend_ops`, or a table
    built already), then the fused Triton kernels: `fused` true (any backend, CUDA only), or
    "auto": with native ops on a CUDA device where Triton is installed (FlagGems keeps every op
    on FlagGems unless they are asked for); Pi0.5's adaptive kernels with true only (see
    `_with_fused`). `persistent`: with the fused kernels, each expert layer at batch 1 in one
    launch. `precision` "fp8": the prefix GEMMs in e4m3 (`fp8`)."""
    table = backend if isinstance(backend, Ops) else backend_ops(backend, routes, cache_dir)
    table = _with_fused(table, str(device), fused, persistent)
    if precision in (None, "bf16"):  # the common case imports no torch here
        return table
    from flagscale.ops import fp8

    if fp8.check_precision(precision, _device(device), bool(table.fused)) == "fp8":
        return table.with_fp8()
    return table


def _with_fused(table: Ops, device: str, fused, persistent) -> Ops:
    """The fused-kernel rule. "auto" adds the kernels measured on GPUs (Pi0's; Pi0.5's expert
    keeps its composed adaptive ops); true adds Pi0.5's adaptive kernels as well
    (`fused_routes.ADAPTIVE`: tested in Triton's interpreter, not yet measured on a GPU)."""
    if table.fused:
        return table
    on_cuda = device.startswith("cuda")
    wanted = str(fused).lower()
    if wanted == "auto":
        if on_cuda and table.backend == "native" and _has_triton():
            return table.with_fused_kernels(persistent, adaptive=False)
        return table
    if not is_true(wanted):
        return table
    if not on_cuda:
        raise ValueError(f"fused_kernels=true needs a CUDA device, not {device}")
    return table.with_fused_kernels(persistent, adaptive=True)


def _device(device):
    import torch

    return torch.device(device)


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
