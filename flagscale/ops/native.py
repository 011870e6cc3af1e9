"""Native (torch) ops: the reference implementation of every primitive the Pi0 model uses.

Shapes: x [..., D]; attention q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh], mask [B, 1 | Lq, Lk] additive.
"""

import torch
import torch.nn.functional as F


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def rms_norm(x, weight, eps=1e-6):
    """Gemma RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), computed in fp32, cast back to x.dtype.

    NOTE: Gemma scales by (1 + w) (weights initialise to zero), not by w.
    """
    return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + weight.float(), eps).to(x.dtype)


def ada_rms_norm(x, scale, shift, eps=1e-6):
    """Pi0.5's adaptive RMSNorm (openpi `GemmaRMSNorm` with a condition):
    x * rsqrt(mean(x^2) + eps) * (1 + scale) + shift, all in fp32, cast back to x.dtype.
    scale / shift [B, 1, D] (or broadcastable) come from the time condition."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return (normed * (1.0 + scale.float()) + shift.float()).to(x.dtype)


def layer_norm(x, weight, bias, eps=1e-6):
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """positions [B, T] -> cos [B, T, 1, Dh], signed sin [B, T, 1, Dh] in fp32, laid out for the
    rotate-halves convention: out = x * cos + cat(x2, x1) * sin, with sin = cat(-sin, sin)."""
    exponents = torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device)
    timescale = theta ** (2.0 * exponents / head_dim)
    radians = positions.to(torch.float32)[..., None] / timescale
    cos, sin = torch.cos(radians), torch.sin(radians)
    return torch.cat([cos, cos], -1)[:, :, None], torch.cat([-sin, sin], -1)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, Dh] -> x1*cos - x2*sin | x2*cos + x1*sin; computed in fp32, cast back."""
    xf = x.float()
    half = x.shape[-1] // 2
    swapped = torch.cat([xf[..., half:], xf[..., :half]], dim=-1)
    return torch.addcmul(xf * cos, swapped, sin).to(x.dtype)


def rope(qk, cos, sin, heads):
    """RoPE on the query and key heads of one projection, qk [B, T, H + Hkv, Dh] (queries first),
    with the per-token tables of `rope_cos_sin` (cos / signed sin [B, T, 1, Dh] fp32) -> new
    rotated q [B, T, H, Dh], k [B, T, Hkv, Dh]."""
    out = apply_rope(qk, cos, sin)
    return out[:, :, :heads], out[:, :, heads:]


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def geglu(gate_up):
    """GeGLU on a fused [..., 2*F] gate|up tensor: gelu_tanh(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu(x):
    return F.silu(x)


def fold_heads(q, k, v, mask):
    """MQA with one K/V head is single-head attention over H*Lq queries: fold heads into the rows.

    Returns q [B, 1, H*Lq, Dh], k/v [B, 1, Lk, Dh], mask [B, 1, H*Lq | 1, Lk].
    """
    b, lq, h, dh = q.shape
    q = q.transpose(1, 2).reshape(b, 1, h * lq, dh)
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)
    if mask is not None and mask.shape[-2] != 1:
        mask = mask[:, None].expand(b, h, lq, mask.shape[-1]).reshape(b, 1, h * lq, -1)
    elif mask is not None:
        mask = mask[:, None]
    return q, k, v, mask


def attention(q, k, v, mask=None, scale=None):
    """Softmax attention with fp32 logits and softmax; q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh]
    -> [B, Lq, H*Dh].

    `mask` is an additive float mask [B, Lq | 1, Lk] in q's dtype (0 = keep, -2.38e38 = drop).
    Hkv is 1 (Gemma MQA) or H (SigLIP). Short MQA queries (the expert's suffix) use explicit fp32
    matmuls (cheap, fusable under torch.compile); long ones use SDPA (fp32 accumulation inside).
    """
    b, lq, h, dh = q.shape
    scale = dh**-0.5 if scale is None else scale
    if k.shape[2] == 1 and h > 1:
        qf, kf, vf, mf = fold_heads(q, k, v, mask)
        if h * lq <= MATH_ROWS:
            out = mqa_math(qf[:, 0], kf[:, 0], vf[:, 0], None if mf is None else mf[:, 0], scale)
        else:
            out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mf, scale=scale)
        return out.reshape(b, h, lq, dh).transpose(1, 2).reshape(b, lq, h * dh)
    mask = None if mask is None else mask[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2).reshape(b, lq, h * dh)


MATH_ROWS = 1024
# bf16 x bf16 -> fp32 bmm (aten::bmm.dtype) exists on recent torch only; older ones upcast first.
# It has no derivative: under autograd (RTC's "vjp" gradient) the upcast form is used instead.
BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def mqa_math(q, k, v, mask, scale):
    """q [B, R, Dh], k/v [B, Lk, Dh], mask [B, R | 1, Lk] -> [B, R, Dh]; fp32 logits and softmax."""
    differentiable = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    half = q.dtype in (torch.bfloat16, torch.float16)
    if q.is_cuda and half and BMM_OUT_DTYPE and not differentiable:
        logits = torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32) * scale
    else:
        logits = torch.bmm(q.float(), k.float().transpose(1, 2)) * scale
    if mask is not None:
        logits = logits + mask  # promotes a bf16 mask to fp32 in the same kernel
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return torch.bmm(probs, v)


MASK_VALUE = -2.3819763e38
