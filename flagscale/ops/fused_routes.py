"""Kernel routing: which fused Triton kernel (`triton_fused.py`) takes an op call, and when.

Each op below tries its kernels in order and falls back to the table's composite (or attention).
A kernel takes a call when the input is bf16/fp16 on a GPU (or under the Triton interpreter), has
1..MAX_ROWS rows, and its shape check holds. The long path (cuBLAS + row-wise kernels, the prefix)
is for the native table only: another backend (FlagGems) keeps its own ops for the prefix.

Pi0.5's adaptive ops (`ADAPTIVE`: adaRMS norm, the adaptive norm + projection ops, the gated
residual) have run in Triton's interpreter only, never on a GPU: `dispatchers` adds them only
with `adaptive`, which `build_ops` sets for `fused_kernels: true` and never for "auto".
"""

from typing import Callable, Dict

import torch

from flagscale.ops import triton_fused as tf

# Rows (batch x tokens; attention: query rows = tokens x heads per sample) up to which each kernel
# runs. Above them cuBLAS + separate kernels measured faster (H200; the expert has 50 rows per
# robot, the prefix 816): qkv_rope wins up to 8 robots, norm_geglu up to 4, linear_residual and
# the one-launch layer at 1 robot only.
MAX_ROWS = {
    "qkv_rope": 512,
    "norm_geglu": 256,
    "linear_residual": 64,
    "decoder_layer": 64,
    # Pi0.5's adaptive ops: as their Pi0 counterparts (not measured on a GPU yet)
    "ada_qkv_rope": 512,
    "ada_norm_geglu": 256,
    "linear_gated_residual": 64,
    "mqa_attention": 1024,
    "mqa_attention_long": 1 << 20,
    "long": 1 << 20,  # the long path: row-wise kernels around cuBLAS
}
HEAD_DIMS = (64, 128, 256)  # the MQA kernel's head sizes
FAST_DTYPES = (torch.bfloat16, torch.float16)


def supported(x: torch.Tensor, max_rows: int) -> bool:
    """x has 1..max_rows rows (all but the last dim) and is bf16/fp16 on a GPU (or on any device
    under the Triton interpreter)."""
    rows = x.numel() // x.shape[-1]
    device_ok = x.is_cuda or tf._INTERPRET
    return device_ok and x.dtype in FAST_DTYPES and 0 < rows <= max_rows


def gemm_shapes_ok(x, weight) -> bool:
    """norm_geglu / linear_residual tiles: output dim % 64, input dim % 128."""
    return weight.shape[0] % 64 == 0 and x.shape[-1] % 128 == 0


def modulation_ok(x, *rows) -> bool:
    """Pi0.5's per-sample modulation rows (scale, shift, gate) for x [B, T, W]: each [B, 1, W]
    with a unit last stride."""
    if x.dim() != 3:
        return False
    b, _, width = x.shape
    return all(r.shape == (b, 1, width) and r.stride(-1) == 1 for r in rows)


def layer_shapes_ok(x, weights, cos, sin, cache_k, cache_v, mask, heads, dh) -> bool:
    """decoder_layer: one K/V head, tile-aligned widths, contiguous rows."""
    f, qd = weights[4].shape[0] // 2, heads * dh
    ok = weights[1].shape[0] == qd + 2 * dh and dh in HEAD_DIMS and x.is_contiguous()
    ok = ok and x.shape[-1] % 128 == 0 and qd % 128 == 0 and f % 128 == 0
    ok = ok and mask.dim() == 3 and mask.stride(-1) == 1 and cache_k.stride(-1) == 1
    ok = ok and cache_k.stride() == cache_v.stride()
    return ok and cos.is_contiguous() and sin.is_contiguous()


def qkv_shapes_ok(x, kv_heads, head_dim) -> bool:
    """qkv_rope tiles: one K/V head, head size % 32, width % 128."""
    return kv_heads == 1 and head_dim % 32 == 0 and x.shape[-1] % 128 == 0


def qkv_config(x, head_dim) -> str:
    """Batches take `qkv_rope_batch` where its tiles divide the half head; one sample
    `qkv_rope`."""
    batch_tiles = (head_dim // 2) % tf.CONFIG["qkv_rope_batch"]["bn"] == 0
    return "qkv_rope_batch" if x.shape[0] > 1 and batch_tiles else "qkv_rope"


class Routes:
    """Fused replacements for `ops`' composites and attention, falling back to them."""

    def __init__(self, ops):
        self.ops, self.base, self.native = ops, ops.composed, ops.backend == "native"

    def qkv_rope(
        self, x, norm_weight, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out
    ):
        args = (x, norm_weight, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out)
        shapes_ok = qkv_shapes_ok(x, kv_heads, head_dim)
        if shapes_ok and supported(x, MAX_ROWS["qkv_rope"]):
            return tf.qkv_rope(*args, config=qkv_config(x, head_dim))
        long_ok = self.native and shapes_ok and cos.is_contiguous() and sin.is_contiguous()
        if long_ok and supported(x, MAX_ROWS["long"]):
            return tf.long_qkv_rope(*args)
        return self.base["qkv_rope"](*args)

    def norm_geglu(self, x, norm_weight, eps, weight):
        shapes_ok = gemm_shapes_ok(x, weight)
        if shapes_ok and supported(x, MAX_ROWS["norm_geglu"]):
            return tf.norm_geglu(x, norm_weight, eps, weight)
        if self.native and shapes_ok and supported(x, MAX_ROWS["long"]):
            return tf.long_norm_geglu(x, norm_weight, eps, weight)
        return self.base["norm_geglu"](x, norm_weight, eps, weight)

    def linear_residual(self, x, weight, residual, inplace=False):
        if gemm_shapes_ok(x, weight) and supported(x, MAX_ROWS["linear_residual"]):
            return tf.linear_residual(x, weight, residual, inplace=inplace)
        if self.native and supported(x, MAX_ROWS["long"]) and residual.dtype == x.dtype:
            return tf.long_linear_residual(x, weight, residual, inplace)
        return self.base["linear_residual"](x, weight, residual, inplace)

    def ada_rms_norm(self, x, scale, shift, eps=1e-6):
        """Native table only (FlagGems has its own); rows of any count (a row kernel)."""
        ok = self.native and modulation_ok(x, scale, shift) and supported(x, MAX_ROWS["long"])
        if ok:
            return tf.ada_rms_norm(x, scale, shift, eps)
        return self.ops.ada_rms_norm(x, scale, shift, eps)

    def ada_qkv_rope(
        self, x, scale, shift, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out
    ):
        args = (x, scale, shift, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out)
        ok = qkv_shapes_ok(x, kv_heads, head_dim) and modulation_ok(x, scale, shift)
        if ok and supported(x, MAX_ROWS["ada_qkv_rope"]):
            return tf.ada_qkv_rope(*args, config=qkv_config(x, head_dim))
        return self.base["ada_qkv_rope"](*args)

    def ada_norm_geglu(self, x, scale, shift, eps, weight):
        ok = gemm_shapes_ok(x, weight) and modulation_ok(x, scale, shift)
        if ok and supported(x, MAX_ROWS["ada_norm_geglu"]):
            return tf.ada_norm_geglu(x, scale, shift, eps, weight)
        return self.base["ada_norm_geglu"](x, scale, shift, eps, weight)

    def linear_gated_residual(self, x, weight, residual, gate, inplace=False):
        ok = gemm_shapes_ok(x, weight) and modulation_ok(residual, gate)
        ok = ok and x.shape[:2] == residual.shape[:2] and gate.dtype == x.dtype == residual.dtype
        if ok and supported(x, MAX_ROWS["linear_gated_residual"]):
            return tf.linear_gated_residual(x, weight, residual, gate, inplace=inplace)
        return self.base["linear_gated_residual"](x, weight, residual, gate, inplace)

    def attention(self, q, k, v, mask=None, scale=None):
        b, lq, h, dh = q.shape
        ok = supported(q, max_rows=1 << 30) and k.shape[2] == 1 and h > 1 and dh in HEAD_DIMS
        ok = ok and q.stride(-1) == 1 and (mask is None or mask.dim() == 3)
        if ok and lq * h <= MAX_ROWS["mqa_attention"]:
            config = "mqa_attention" if b == 1 else "mqa_attention_batch"
            return tf.mqa_attention(q, k, v, mask, scale, config=config)
        if ok and self.native and lq * h <= MAX_ROWS["mqa_attention_long"]:
            return tf.mqa_attention(q, k, v, mask, scale, config="mqa_attention_long")
        return self.ops.attention(q, k, v, mask, scale)

    def decoder_layer(self, x, weights, eps, cos, sin, cache_k, cache_v, start, mask, heads, dh):
        """The whole layer in one launch, or None where the shape is not covered."""
        ok = layer_shapes_ok(x, weights, cos, sin, cache_k, cache_v, mask, heads, dh)
        if ok and supported(x, MAX_ROWS["decoder_layer"]):
            args = (x, weights, eps, cos, sin, cache_k, cache_v, start, mask, heads, dh)
            return tf.decoder_layer(*args)
        return None

    def linear_gelu(self, x, weight, bias):
        ok = self.native and bias is not None and bias.dim() == 1 and bias.dtype == x.dtype
        # CUDA only, also under the interpreter: on the CPU the epilogue is the erf GELU, not tanh
        if ok and x.is_cuda and supported(x, MAX_ROWS["long"]):
            return tf.long_linear_gelu(x, weight, bias)
        return self.base["linear_gelu"](x, weight, bias)

    def add_layer_norm(self, x, y, weight, bias, eps):
        same = y.shape == x.shape and y.dtype == x.dtype and x.stride(-1) == y.stride(-1) == 1
        if self.native and same and supported(x, MAX_ROWS["long"]):
            return tf.add_layer_norm(x, y, weight, bias, eps)
        return self.base["add_layer_norm"](x, y, weight, bias, eps)


ROUTED = ("add_layer_norm", "linear_gelu", "qkv_rope", "norm_geglu", "linear_residual", "attention")
# Pi0.5's expert: interpreter-tested only (see the module docstring), added with `adaptive`
ADAPTIVE = ("ada_rms_norm", "ada_qkv_rope", "ada_norm_geglu", "linear_gated_residual")


def dispatchers(ops, persistent_layers: bool = True, adaptive: bool = False) -> Dict[str, Callable]:
    """The routed ops of `ops`, by name. With `persistent_layers`, `decoder_layer` runs a whole
    expert layer in one launch where the shape is covered (None elsewhere); with `adaptive`,
    Pi0.5's adaptive ops take their kernels too."""
    routes = Routes(ops)
    names = ROUTED + (("decoder_layer",) if persistent_layers else ())
    names += ADAPTIVE if adaptive else ()
    # torch.compile (engine.compile) must not trace into these: the kernels write through
    # pointers it cannot follow (KV-cache slices chosen per program); an H200 run that let it
    # ended in an illegal memory access. Compiled passes call them as opaque eager ops.
    return {name: torch.compiler.disable(getattr(routes, name)) for name in names}
