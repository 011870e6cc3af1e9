"""Composite ops: the few multi-op patterns of a Gemma layer, composed from a table's primitives.

They are what the fused Triton kernels (`triton_fused.py`) replace; composed from the primitives
they are also those kernels' reference, and what every other backend (FlagGems) runs.
"""

from typing import Callable, Dict

import torch

from flagscale.ops.native import apply_rope

COMPOSITE_NAMES = (
    "qkv_rope",
    "norm_geglu",
    "linear_residual",
    "add_layer_norm",
    "action_mlp",
    "action_out",
)


def compose(ops) -> Dict[str, Callable]:
    """Composite implementations built on `ops`' primitives (linear, norms, geglu)."""

    def qkv_rope(x, norm_weight, eps, weight, cos, sin, heads, kv_heads, head_dim, k_out, v_out):
        """x [B, T, W] -> RMSNorm(1 + w) -> q|k|v -> RoPE on q and k. Returns q [B, T, H, Dh];
        k, v are written into k_out / v_out [B, T, Hkv*Dh] (e.g. KV-cache slices)."""
        b, t, _ = x.shape
        qkv = ops.linear(ops.rms_norm(x, norm_weight, eps), weight)
        n_qk = heads + kv_heads
        qk = apply_rope(qkv[..., : n_qk * head_dim].view(b, t, n_qk, head_dim), cos, sin)
        k_out.copy_(qk[:, :, heads:].reshape(k_out.shape))
        v_out.copy_(qkv[..., n_qk * head_dim :].reshape(v_out.shape))
        return qk[:, :, :heads]

    def norm_geglu(x, norm_weight, eps, weight):
        """RMSNorm(1 + w) -> gate|up projection -> gelu_tanh(gate) * up."""
        return ops.geglu(ops.linear(ops.rms_norm(x, norm_weight, eps), weight))

    def linear_residual(x, weight, residual):
        return residual + ops.linear(x, weight)

    def add_layer_norm(x, y, weight, bias, eps):
        """SigLIP's residual add and the LayerNorm after it: -> (x + y, LayerNorm(x + y))."""
        total = x + y
        return total, ops.layer_norm(total, weight, bias, eps)

    def action_mlp(x_t, time_emb, w_a, b_a, w_in, b_in, w_out, b_out):
        """Pi0's action tokens: x_t [B, C, A] fp32, time_emb [B, W] -> [B, C, W] =
        mlp_out(silu(mlp_in(concat(action_in(x_t), time)))), in the weights' dtype."""
        b, chunk = x_t.shape[:2]
        act = ops.linear(x_t.to(w_a.dtype), w_a, b_a)
        h = torch.cat([act, time_emb[:, None].expand(b, chunk, -1)], dim=-1)  # action first
        return ops.linear(ops.silu(ops.linear(h, w_in, b_in)), w_out, b_out)

    def action_out(h, norm_weight, eps, w_out, b_out, x_t, dt):
        """One Euler step from the expert's last hidden states h [B, C, W]:
        x_t + dt * action_out(RMSNorm(1 + w)(h)), x_t [B, C, A] fp32 -> fp32."""
        v = ops.linear(ops.rms_norm(h, norm_weight, eps), w_out, b_out)
        return x_t + dt * v.float()

    return {
        "action_mlp": action_mlp,
        "action_out": action_out,
        "qkv_rope": qkv_rope,
        "norm_geglu": norm_geglu,
        "linear_residual": linear_residual,
        "add_layer_norm": add_layer_norm,
    }
