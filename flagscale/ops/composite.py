"""Composite ops: the few multi-op patterns of a Gemma layer, composed from a table's primitives.

They are what the fused Triton kernels (`triton_fused.py`) replace; composed from the primitives
they are also those kernels' reference, and what every other backend (FlagGems) runs.
"""

from typing import Callable, Dict

COMPOSITE_NAMES = ("qkv_rope", "norm_geglu", "linear_residual", "add_layer_norm", "linear_gelu")


def compose(ops) -> Dict[str, Callable]:
    """Composite implementations built on `ops`' primitives (linear, norms, geglu)."""

    def qkv_rope(x, norm_weight, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out):
        """x [B, T, W] -> RMSNorm(1 + w) -> q|k|v -> RoPE on q and k. Returns q [B, T, H, Dh];
        k, v are written into k_out / v_out [B, T, Hkv*Dh] (e.g. KV-cache slices)."""
        b, t, _ = x.shape
        qkv = ops.linear(ops.rms_norm(x, norm_weight, eps), weight)
        n_qk = heads + kv_heads
        qk = qkv[..., : n_qk * head_dim].view(b, t, n_qk, head_dim)
        q, k = ops.rope(qk, cos, sin, heads)
        k_out.copy_(k.reshape(k_out.shape))
        v_out.copy_(qkv[..., n_qk * head_dim :].reshape(v_out.shape))
        return q

    def norm_geglu(x, norm_weight, eps, weight):
        """RMSNorm(1 + w) -> gate|up projection -> gelu_tanh(gate) * up."""
        return ops.geglu(ops.linear(ops.rms_norm(x, norm_weight, eps), weight))

    def linear_residual(x, weight, residual, inplace=False):
        """residual + x @ W^T; with `inplace` the sum may reuse residual's memory (a tensor the
        caller owns and will not read again: no new tensor, no copy). Use the return value."""
        if inplace:
            return residual.add_(ops.linear(x, weight))
        return residual + ops.linear(x, weight)

    def linear_gelu(x, weight, bias):
        """gelu_tanh(x @ W^T + b): SigLIP's fc1 and its activation."""
        return ops.gelu_tanh(ops.linear(x, weight, bias))

    def add_layer_norm(x, y, weight, bias, eps):
        """SigLIP's residual add and the LayerNorm after it: -> (x + y, LayerNorm(x + y))."""
        total = x + y
        return total, ops.layer_norm(total, weight, bias, eps)

    return {
        "qkv_rope": qkv_rope,
        "norm_geglu": norm_geglu,
        "linear_residual": linear_residual,
        "add_layer_norm": add_layer_norm,
        "linear_gelu": linear_gelu,
    }
