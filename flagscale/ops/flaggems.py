"""FlagGems op routes: the Pi0 op layer calling FlagGems (Triton) kernels explicitly.

Nothing here patches ATen: `flag_gems.enable()` is never called, so ops FlagGems 5.0.2 gets wrong on
Hopper (`mul`, `fill_*`, `sqrt`) are never reached. Each op of the `Ops` table is either routed to a
FlagGems entry point or kept native; the table's `routes` says which, in words:

    linear      flag_gems.mm (no bias) / flag_gems.addmm (bias), bf16/fp16 only; fp32 -> native
                (FlagGems' Hopper fp32 mm is tf32x3, not IEEE fp32)
    rms_norm    flag_gems.rms_norm(x, (D,), 1 + w, eps): Gemma's (1 + w) scale, fp32 math
    ada_rms_norm  flag_gems.rms_norm on the fp32 input with weight 1 (no rounding before the
                modulation), then * (1 + scale) + shift in fp32 torch (FlagGems has no
                adaptive RMSNorm; Pi0.5's expert only)
    layer_norm  flag_gems.layer_norm (fp32 math, fp32 weight/bias)
    rope        flag_gems.apply_rotary_pos_emb: q and k in one launch, each token reads its own row
                of the per-token cos / sin tables (fp32 math, one rounding)
    gelu_tanh   flag_gems.gelu(approximate="tanh")
    geglu       flag_gems.geglu (fused gate|up input, gelu_tanh(gate) * up in fp32, one rounding)
    silu        flag_gems.silu
    attention   flag_gems.scaled_dot_product_attention, MQA via enable_gqa, Pi0's additive float
                mask broadcast over heads (never a bool mask: FlagGems inverts those); head_dim
                outside {16, 32, 64, 128, 256} (SigLIP's 72) falls back to native SDPA, logged once

`flag_gems` is imported only when a FlagGems table is built (it needs a GPU and initialises CUDA at
import). The fused residual RMSNorm (`flag_gems.fused_add_rms_norm`, in place) is not used: the
model's residual add is not an op of the table (see docs/flaggems.md).
"""

import os
import sys

from typing import Callable, Dict, Mapping, Optional

import torch

from flagscale.logger import get_logger
from flagscale.ops import OP_NAMES, Ops, make_ops, native

logger = get_logger(__name__)

ROUTES = ("native", "flaggems")
SDPA_HEAD_DIMS = (16, 32, 64, 128, 256)
FAST_DTYPES = (torch.bfloat16, torch.float16)
ADVICE = "set USE_FLAGGEMS=false (or engine.ops: native) to serve with native torch ops"

# What `routes` says for each op when it goes to FlagGems.
ROUTE_TEXT = {
    "linear": "flaggems (mm/addmm; fp32 inputs: native)",
    "rms_norm": "flaggems (rms_norm, weight 1+w)",
    "ada_rms_norm": "flaggems (rms_norm fp32, weight 1; modulation in torch fp32)",
    "layer_norm": "flaggems (layer_norm)",
    "rope": "flaggems (apply_rotary_pos_emb)",
    "gelu_tanh": "flaggems (gelu tanh)",
    "geglu": "flaggems (geglu, fused gate|up)",
    "silu": "flaggems (silu)",
    "attention": "flaggems (sdpa, head_dim 16/32/64/128/256: Gemma 256); "
    "native (fallback: other head_dim e.g. SigLIP 72, fp32)",
}


# ------------------------------------------------------------------------------------------------
# import and cache
# ------------------------------------------------------------------------------------------------


def configure_cache(cache_dir: Optional[str]) -> Optional[str]:
    """Point FlagGems' autotune cache (FLAGGEMS_CACHE_DIR) at `cache_dir`; must run before import.

    Triton's kernel cache (TRITON_CACHE_DIR) goes to `<cache_dir>/triton` unless already set, so one
    directory holds everything a warm start needs. Returns the directory used (None: defaults).
    """
    if not cache_dir:
        return os.environ.get("FLAGGEMS_CACHE_DIR")
    path = os.path.abspath(os.path.expanduser(str(cache_dir)))
    if "flag_gems" in sys.modules and os.environ.get("FLAGGEMS_CACHE_DIR") != path:
        logger.warning(
            "flag_gems already imported: FLAGGEMS_CACHE_DIR=%s takes effect next start", path
        )
    os.makedirs(path, exist_ok=True)
    os.environ["FLAGGEMS_CACHE_DIR"] = path
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(path, "triton"))
    return path


def load_flag_gems(cache_dir: Optional[str] = None):
    """Import flag_gems (lazily, once); a clear error without a GPU or without the package."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"FlagGems ops were selected but no CUDA GPU is available; {ADVICE}")
    configure_cache(cache_dir)
    try:
        import flag_gems
    except ImportError as e:
        raise ImportError(
            f"FlagGems ops were selected but flag_gems cannot be imported ({e}); install it with "
            f"`pip install '.[flaggems]' && pip install --no-deps flag-gems==5.0.2`, or {ADVICE}"
        ) from e
    except RuntimeError as e:  # vendor/device detection at import
        raise RuntimeError(f"flag_gems failed to initialise ({e}); {ADVICE}") from e
    return flag_gems


# ------------------------------------------------------------------------------------------------
# op implementations (each make_* binds one op to the imported module; see MAKERS)
# ------------------------------------------------------------------------------------------------


def tma_ready(x2):
    """Hopper mm reads A through TMA descriptors: 16-byte aligned base and row stride."""
    if x2.stride(-1) != 1 or (x2.stride(0) * x2.element_size()) % 16:
        x2 = x2.contiguous()
    if x2.data_ptr() % 16:
        x2 = x2.clone()
    return x2


def make_linear(fg) -> Callable:
    def linear(x, weight, bias=None):
        if x.dtype not in FAST_DTYPES or weight.dtype != x.dtype:
            return native.linear(x, weight, bias)
        if bias is not None and bias.dtype != x.dtype:
            return native.linear(x, weight, bias)
        x2 = tma_ready(x.reshape(-1, x.shape[-1]))
        out = fg.mm(x2, weight.t()) if bias is None else fg.addmm(bias, x2, weight.t())
        return out.view(*x.shape[:-1], weight.shape[0])

    return linear


def make_rms_norm(fg) -> Callable:
    scales = {}  # id(weight) -> (weight, version, 1 + weight): the (1 + w) add once per weight

    def scale_of(weight):
        entry = scales.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] != weight._version:
            entry = (weight, weight._version, (1.0 + weight.float()).contiguous())
            scales[id(weight)] = entry
        return entry[2]

    def rms_norm(x, weight, eps=1e-6):
        return fg.rms_norm(x, (x.shape[-1],), scale_of(weight), eps)

    return rms_norm


def make_ada_rms_norm(fg) -> Callable:
    ones = {}  # (width, device) -> fp32 ones

    def ada_rms_norm(x, scale, shift, eps=1e-6):
        d = x.shape[-1]
        weight = ones.get((d, x.device))
        if weight is None:
            weight = ones[(d, x.device)] = torch.ones(d, dtype=torch.float32, device=x.device)
        normed = fg.rms_norm(x.float(), (d,), weight, eps)
        return (normed * (1.0 + scale.float()) + shift.float()).to(x.dtype)

    return ada_rms_norm


def make_layer_norm(fg) -> Callable:
    def layer_norm(x, weight, bias, eps=1e-6):
        return fg.layer_norm(x, (x.shape[-1],), weight, bias, eps)[0]

    return layer_norm


def make_rope(fg) -> Callable:
    def rope(qk, cos, sin, heads):
        """q and k heads as two views of qk, in one launch. FlagGems indexes half-width tables
        [rows, Dh/2] by position id: the rows are the tokens' own (B*T of them), cos' first
        half and the signed sin's second half (+sin)."""
        b, t, _, dh = qk.shape
        cos = cos.expand(b, t, 1, dh).reshape(b * t, dh)[:, : dh // 2]
        sin = sin.expand(b, t, 1, dh).reshape(b * t, dh)[:, dh // 2 :]
        rows = torch.arange(b * t, device=qk.device).view(b, t)
        return fg.apply_rotary_pos_emb(qk[:, :, :heads], qk[:, :, heads:], cos, sin, rows)

    return rope


def make_gelu_tanh(fg) -> Callable:
    def gelu_tanh(x):
        return fg.gelu(x, approximate="tanh")

    return gelu_tanh


def make_geglu(fg) -> Callable:
    def geglu(gate_up):
        return fg.geglu(gate_up)

    return geglu


def make_silu(fg) -> Callable:
    def silu(x):
        return fg.silu(x)

    return silu


def make_attention(fg) -> Callable:
    warned = set()

    def fallback(q, k, v, mask, scale):
        dh = q.shape[-1]
        if dh not in warned:
            warned.add(dh)
            logger.info(
                "attention head_dim=%d: FlagGems SDPA supports %s; using native SDPA (fallback)",
                dh,
                SDPA_HEAD_DIMS,
            )
        return native.attention(q, k, v, mask, scale)

    def attention(q, k, v, mask=None, scale=None):
        b, lq, h, dh = q.shape
        if dh not in SDPA_HEAD_DIMS or q.dtype not in FAST_DTYPES:
            return fallback(q, k, v, mask, scale)
        scale = dh**-0.5 if scale is None else scale
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is not None:  # [B, Lq|1, Lk] additive float -> [B, H, Lq, Lk] (stride-0 views)
            mask = mask.to(q.dtype)[:, None].expand(b, h, lq, mask.shape[-1])
        out = fg.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=kh.shape[1] != h
        )
        return out.transpose(1, 2).reshape(b, lq, h * dh)

    return attention


MAKERS = {
    "linear": make_linear,
    "rms_norm": make_rms_norm,
    "ada_rms_norm": make_ada_rms_norm,
    "layer_norm": make_layer_norm,
    "rope": make_rope,
    "gelu_tanh": make_gelu_tanh,
    "geglu": make_geglu,
    "silu": make_silu,
    "attention": make_attention,
}


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def resolve_routes(overrides: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Every op to "flaggems" unless `overrides` names it (values "native" or "flaggems")."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OP_NAMES))
    if unknown:
        raise ValueError(f"unknown op(s) in routes: {unknown}; ops are {list(OP_NAMES)}")
    for name, route in overrides.items():
        if str(route).lower() not in ROUTES:
            raise ValueError(f"route for {name!r} must be one of {ROUTES}, got {route!r}")
    return {name: str(overrides.get(name, "flaggems")).lower() for name in OP_NAMES}


def flaggems_ops(
    routes: Optional[Mapping[str, str]] = None, cache_dir: Optional[str] = None
) -> Ops:
    """The FlagGems op table. `routes={"linear": "native"}` keeps chosen ops native.

    `cache_dir` sets FLAGGEMS_CACHE_DIR (and TRITON_CACHE_DIR) before flag_gems is imported.
    """
    chosen = resolve_routes(routes)
    wanted = [name for name in OP_NAMES if chosen[name] == "flaggems"]
    fg = load_flag_gems(cache_dir) if wanted else None
    impls, described = {}, {}
    for name in OP_NAMES:
        if chosen[name] == "flaggems":
            impls[name], described[name] = MAKERS[name](fg), ROUTE_TEXT[name]
        else:
            impls[name], described[name] = getattr(native, name), "native (override)"
    version = getattr(fg, "__version__", "?") if wanted else "not imported"
    ops = make_ops("flaggems", described, impls)
    logger.info("FlagGems %s op routes: %s", version, ops.describe())
    return ops
