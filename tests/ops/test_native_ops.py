"""Each building block against a plain float64 formula."""

import math

import pytest
import torch

from reference_ops import attention_reference

from flagscale.models.pi0.modeling_pi0 import (
    additive_mask,
    make_attn_mask,
    posemb_sincos,
    rope_cos_sin,
)
from flagscale.ops import native
from flagscale.ops.native import apply_rope

torch.manual_seed(0)


def test_rms_norm_uses_one_plus_weight_in_fp32():
    x = torch.randn(5, 769, dtype=torch.float64) * 3
    w = torch.randn(769, dtype=torch.float64) * 0.3
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * (1 + w)
    out = native.rms_norm(x.float(), w.float(), 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # bf16 input: fp32 math, one rounding at the end -> within 1 bf16 ulp of the exact value
    out16 = native.rms_norm(x.bfloat16(), w.float(), 1e-6)
    assert out16.dtype == torch.bfloat16
    err = (out16.double() - ref).abs()
    x16_err = (x.bfloat16().double() - x).abs().max()  # input rounding propagates too
    assert err.max() <= 2 * 2**-8 * ref.abs().max() + 4 * x16_err


def test_ada_rms_norm_modulates_in_fp32_with_one_rounding():
    """Pi0.5: rms(x) * (1 + scale) + shift, fp32 math (bf16 input: one rounding at the end)."""
    x = torch.randn(2, 5, 769, dtype=torch.float64) * 3
    scale = torch.randn(2, 1, 769, dtype=torch.float64) * 0.5
    shift = torch.randn(2, 1, 769, dtype=torch.float64) * 0.5
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * (1 + scale) + shift
    out = native.ada_rms_norm(x.float(), scale.float(), shift.float(), 1e-6)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out16 = native.ada_rms_norm(x.bfloat16(), scale.float(), shift.float(), 1e-6)
    assert out16.dtype == torch.bfloat16
    exact = native.ada_rms_norm(x.bfloat16().float(), scale.float(), shift.float(), 1e-6)
    assert torch.equal(out16, exact.bfloat16())


def test_layer_norm_matches_formula():
    x = torch.randn(7, 83, dtype=torch.float64)
    w, b = torch.randn(83, dtype=torch.float64), torch.randn(83, dtype=torch.float64)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-6) * w + b
    out = native.layer_norm(x.float(), w.float(), b.float(), 1e-6)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def gelu_tanh64(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_gelu_tanh_and_geglu():
    x = torch.randn(3, 2 * 97, dtype=torch.float64) * 3
    torch.testing.assert_close(
        native.gelu_tanh(x.float()).double(), gelu_tanh64(x), rtol=1e-5, atol=1e-6
    )
    gate, up = x[:, :97], x[:, 97:]
    ref = gelu_tanh64(gate) * up
    torch.testing.assert_close(native.geglu(x.float()).double(), ref, rtol=1e-5, atol=1e-5)


def test_rope_rotate_halves_formula():
    b, t, h, d = 2, 9, 3, 16
    x = torch.randn(b, t, h, d, dtype=torch.float64)
    pos = torch.randint(0, 500, (b, t))
    cos, sin = rope_cos_sin(pos, d, 10000.0)
    out = apply_rope(x.float(), cos, sin).double()
    freq = 1.0 / 10000.0 ** (torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    ang = pos.double()[..., None, None] * freq
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    ref = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_time_embedding_sin_first_periods():
    t = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float32)
    emb = posemb_sincos(t, 1024, 4e-3, 4.0)
    frac = torch.linspace(0, 1, 512, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** frac
    arg = t.double()[:, None] * 2 * math.pi / period
    ref = torch.cat([arg.sin(), arg.cos()], -1)
    assert emb.shape == (3, 1024) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.double(), ref, rtol=0, atol=1e-6)


def attention64(q, k, v, allowed, scale):
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).flatten(2)


@pytest.mark.parametrize("kv_heads", [1, 4])
@pytest.mark.parametrize("mask_rows", ["full", "keys"])
@pytest.mark.parametrize("lq", [7, 300])  # 4 * 300 rows > MATH_ROWS: the SDPA path
def test_masked_attention_matches_float64(kv_heads, mask_rows, lq):
    b, lk, h, d = 2, 13, 4, 16
    q = torch.randn(b, lq, h, d, dtype=torch.float64)
    k = torch.randn(b, lk, kv_heads, d, dtype=torch.float64)
    v = torch.randn(b, lk, kv_heads, d, dtype=torch.float64)
    if mask_rows == "full":
        allowed = torch.rand(b, lq, lk) > 0.3
        allowed[..., 0] = True
    else:
        allowed = (torch.rand(b, 1, lk) > 0.3).expand(b, lq, lk).clone()
        allowed[..., 0] = True
    mask = additive_mask(allowed if mask_rows == "full" else allowed[:, :1], torch.float32)
    out = native.attention(q.float(), k.float(), v.float(), mask, scale=d**-0.5)
    ref = attention64(q, k, v, allowed, d**-0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    eager = attention_reference(q.float(), k.float(), v.float(), mask, scale=d**-0.5)
    torch.testing.assert_close(eager.double(), ref, rtol=1e-5, atol=1e-5)


def test_make_attn_mask_prefix_state_action_blocks():
    # 3 prefix tokens (last one padding), 1 state token, 2 action tokens
    pad = torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    ar = torch.tensor([[0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    m = make_attn_mask(pad, ar)[0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],  # prefix: bidirectional over valid prefix only
            [1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],  # padding attends to nothing
            [1, 1, 0, 1, 0, 0],  # state: prefix + itself
            [1, 1, 0, 1, 1, 1],  # actions: everything valid
            [1, 1, 0, 1, 1, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_additive_mask_uses_openpi_constant():
    m = additive_mask(torch.tensor([[True, False]]), torch.float32)
    assert m[0, 0] == 0 and m[0, 1] == pytest.approx(-2.3819763e38, rel=1e-6)
