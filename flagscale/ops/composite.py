"""Composite ops: the few multi-op patterns of a Gemma layer, composed from a table's primitives.

They are what the fused Triton kernels (`triton_fused.py`) replace; composed from the primitives
they are also those kernels' reference, and what every other backend (FlagGems) runs.
"""

from typing import Callable, Dict

COMPOSITE_NAMES = (
    "qkv_rope",
    "norm_geglu",
    "linear_residual",
    "add_layer_norm",
    "linear_gelu",
    "ada_qkv_rope",
    "ada_norm_geglu",
    "linear_gated_residual",
)


class Composed:
    """Composite implementations built on `ops`' primitives (linear, norms, geglu), looked up at
    call time."""

    def __init__(self, ops):
        self.ops = ops

    def qkv_rope(
        self, x, norm_weight, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out
    ):
        """x [B, T, W] -> RMSNorm(1 + w) -> q|k|v -> RoPE on q and k. Returns q [B, T, H, Dh];
        k, v are written into k_out / v_out [B, T, Hkv*Dh] (e.g. KV-cache slices)."""
        h = self.ops.rms_norm(x, norm_weight, eps)
        return self.project_qkv(h, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out)

    def ada_qkv_rope(
        self, x, scale, shift, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out
    ):
        """`qkv_rope` with Pi0.5's adaptive RMSNorm (scale / shift from the time condition)."""
        h = self.ops.ada_rms_norm(x, scale, shift, eps)
        return self.project_qkv(h, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out)

    def project_qkv(self, h, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out):
        b, t, _ = h.shape
        qkv = self.ops.linear(h, weight)
        n_qk = heads + kv_heads
        qk = qkv[..., : n_qk * head_dim].view(b, t, n_qk, head_dim)
        q, k = self.ops.rope(qk, cos, sin, heads)
        k_out.copy_(k.reshape(k_out.shape))
        v_out.copy_(qkv[..., n_qk * head_dim :].reshape(v_out.shape))
        return q

    def norm_geglu(self, x, norm_weight, eps, weight):
        """RMSNorm(1 + w) -> gate|up projection -> gelu_tanh(gate) * up."""
        return self.ops.geglu(self.ops.linear(self.ops.rms_norm(x, norm_weight, eps), weight))

    def ada_norm_geglu(self, x, scale, shift, eps, weight):
        """Adaptive RMSNorm -> gate|up projection -> gelu_tanh(gate) * up (Pi0.5's expert)."""
        return self.ops.geglu(self.ops.linear(self.ops.ada_rms_norm(x, scale, shift, eps), weight))

    def linear_residual(self, x, weight, residual, inplace=False):
        """residual + x @ W^T; with `inplace` the sum may reuse residual's memory (a tensor the
        caller owns and will not read again: no new tensor, no copy). Use the return value."""
        if inplace:
            return residual.add_(self.ops.linear(x, weight))
        return residual + self.ops.linear(x, weight)

    def linear_gated_residual(self, x, weight, residual, gate, inplace=False):
        """residual + (x @ W^T) * gate: Pi0.5's gated residual (gate [B, 1, W] in x's dtype)."""
        branch = self.ops.linear(x, weight) * gate
        return residual.add_(branch) if inplace else residual + branch

    def linear_gelu(self, x, weight, bias):
        """gelu_tanh(x @ W^T + b): SigLIP's fc1 and its activation."""
        return self.ops.gelu_tanh(self.ops.linear(x, weight, bias))

    def add_layer_norm(self, x, y, weight, bias, eps):
        """SigLIP's residual add and the LayerNorm after it: -> (x + y, LayerNorm(x + y))."""
        total = x + y
        return total, self.ops.layer_norm(total, weight, bias, eps)


def compose(ops) -> Dict[str, Callable]:
    """The composites of `ops`, by name."""
    composed = Composed(ops)
    return {name: getattr(composed, name) for name in COMPOSITE_NAMES}
