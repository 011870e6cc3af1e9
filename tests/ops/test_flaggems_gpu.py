"""FlagGems routes vs the native ops on a GPU (`pytest -m flaggems`; skipped without CUDA or flag_gems).

Each routed op runs on Pi0 shapes and odd sizes in bf16. Both the FlagGems op and the native op are
compared with a float64 reference computed from the same bf16 inputs; the FlagGems error may be at
most 2x the native op's own error plus a floor of one bf16 half-ulp of the output's magnitude (for
max-abs) or 0.1 % (for relative L2). First calls autotune (seconds per new shape); a warm
FLAGGEMS_CACHE_DIR makes reruns fast.
"""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from flagscale.ops import build_ops, native
from flagscale.ops.native import MASK_VALUE

pytestmark = [
    pytest.mark.flaggems,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flag_gems") is None, reason="needs flag_gems"),
]

BF16 = torch.bfloat16
HALF_ULP = 2.0**-9  # bf16 has 8 significant bits: half an ulp at 1.0


@pytest.fixture(scope="module")
def fg():
    return build_ops("flaggems")


def gen(seed=0):
    return torch.Generator(device="cuda").manual_seed(seed)


def randn(*shape, seed=0, scale=1.0, dtype=BF16):
    return (torch.randn(*shape, generator=gen(seed), device="cuda") * scale).to(dtype)


def errors(out, ref64):
    d = out.double() - ref64
    return d.abs().max().item(), (d.norm() / ref64.norm().clamp_min(1e-30)).item()


def assert_within_bf16(test, base, ref64, factor=2.0):
    """FlagGems error vs float64 <= factor x the native op's error + a bf16 floor."""
    assert test.shape == base.shape and test.dtype == base.dtype
    assert torch.isfinite(test).all()
    t_max, t_rel = errors(test, ref64)
    n_max, n_rel = errors(base, ref64)
    floor = HALF_ULP * ref64.abs().max().item()
    assert t_max <= factor * n_max + floor, (t_max, n_max, floor)
    assert t_rel <= factor * n_rel + 1e-3, (t_rel, n_rel)


# ---- float64 references ---------------------------------------------------------------------


def linear64(x, w, b=None):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def rms_norm64(x, w, eps=1e-6):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w.double())


def layer_norm64(x, w, b, eps=1e-6):
    return F.layer_norm(x.double(), (x.shape[-1],), w.double(), b.double(), eps)


def gelu64(x):
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def attention64(q, k, v, mask=None):
    b, lq, h, dh = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2).double(), v.repeat_interleave(rep, dim=2).double()
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * dh**-0.5
    if mask is not None:
        logits = logits + mask[:, None].double()
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, dim=-1), v)
    return out.reshape(b, lq, h * dh)


# ---- linear ---------------------------------------------------------------------------------

LINEAR_SHAPES = [
    # (rows, in, out, bias): Gemma prefix qkv, expert gate|up (51 = state + chunk), SigLIP fc1,
    # the state pass (one row), odd sizes (non-TMA path)
    (816, 2048, 2560, False),
    (51, 1024, 8192, False),
    (768, 1152, 4304, True),
    (1, 1024, 2560, False),
    (7, 83, 769, False),
    (83, 769, 7, True),
]


@pytest.mark.parametrize("rows, d_in, d_out, bias", LINEAR_SHAPES)
def test_linear(fg, rows, d_in, d_out, bias):
    x = randn(1, rows, d_in, seed=1)
    w = randn(d_out, d_in, seed=2, scale=d_in**-0.5)
    b = randn(d_out, seed=3, scale=0.02) if bias else None
    assert_within_bf16(fg.linear(x, w, b), native.linear(x, w, b), linear64(x, w, b))


def test_linear_fp32_stays_native(fg):
    x, w = randn(7, 83, dtype=torch.float32), randn(769, 83, seed=2, dtype=torch.float32)
    torch.testing.assert_close(fg.linear(x, w), native.linear(x, w), rtol=0, atol=0)


# ---- norms and activations ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(816, 2048), (51, 1024), (7, 83)])
def test_rms_norm(fg, shape):
    x = randn(1, *shape, seed=4, scale=3.0)
    w = torch.empty(shape[-1], device="cuda").uniform_(-0.2, 0.2, generator=gen(5))
    out = fg.rms_norm(x, w, 1e-6)
    assert_within_bf16(out, native.rms_norm(x, w, 1e-6), rms_norm64(x, w))


@pytest.mark.parametrize("shape", [(50, 1024), (7, 83)])
def test_ada_rms_norm(fg, shape):
    """Pi0.5's adaptive norm: scale / shift [B, 1, D] fp32 from the time condition."""
    x = randn(2, *shape, seed=4, scale=3.0)
    scale = torch.randn(2, 1, shape[-1], generator=gen(5), device="cuda") * 0.5
    shift = torch.randn(2, 1, shape[-1], generator=gen(6), device="cuda") * 0.5
    out = fg.ada_rms_norm(x, scale, shift, 1e-6)
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref = ref * (1 + scale.double()) + shift.double()
    assert_within_bf16(out, native.ada_rms_norm(x, scale, shift, 1e-6), ref)


@pytest.mark.parametrize("shape", [(768, 1152), (7, 769)])
def test_layer_norm(fg, shape):
    x = randn(1, *shape, seed=6, scale=2.0)
    w = 1 + torch.empty(shape[-1], device="cuda").uniform_(-0.2, 0.2, generator=gen(7))
    b = torch.randn(shape[-1], device="cuda", generator=gen(8)) * 0.02
    out = fg.layer_norm(x, w, b, 1e-6)
    assert_within_bf16(out, native.layer_norm(x, w, b, 1e-6), layer_norm64(x, w, b))


def rope64(x, positions, theta=10000.0):
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
    angle = positions.double()[..., None, None] * freq
    x1, x2 = x.double()[..., :half], x.double()[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


@pytest.mark.parametrize(
    "batch, tokens, heads, dh", [(1, 816, 8, 256), (3, 51, 8, 256), (2, 7, 2, 16)]
)
def test_rope(fg, batch, tokens, heads, dh):
    """q and k as views of one projection row (the composite's layout), per-sample positions."""
    qkv = randn(batch, tokens, (heads + 2) * dh, seed=12, scale=2.0)
    qk = qkv[..., : (heads + 1) * dh].view(batch, tokens, heads + 1, dh)
    positions = (
        torch.arange(tokens, device="cuda")[None] + 5 * torch.arange(batch, device="cuda")[:, None]
    )
    cos, sin = native.rope_cos_sin(positions, dh, 10000.0)
    outs, bases = fg.rope(qk, cos, sin, heads), native.rope(qk, cos, sin, heads)
    for out, base, x in zip(outs, bases, (qk[:, :, :heads], qk[:, :, heads:])):
        assert_within_bf16(out, base, rope64(x, positions))


@pytest.mark.parametrize("shape", [(768, 4304), (7, 83)])
def test_gelu_tanh(fg, shape):
    x = randn(1, *shape, seed=9, scale=2.0)
    assert_within_bf16(fg.gelu_tanh(x), native.gelu_tanh(x), gelu64(x))


@pytest.mark.parametrize("shape", [(816, 2 * 16384), (51, 2 * 4096), (7, 2 * 83)])
def test_geglu(fg, shape):
    x = randn(1, *shape, seed=10, scale=2.0)
    gate, up = x.double().chunk(2, dim=-1)
    assert_within_bf16(fg.geglu(x), native.geglu(x), gelu64(gate) * up)


@pytest.mark.parametrize("shape", [(50, 1024), (7, 83)])
def test_silu(fg, shape):
    x = randn(1, *shape, seed=11, scale=2.0)
    assert_within_bf16(fg.silu(x), native.silu(x), F.silu(x.double()))


# ---- attention ------------------------------------------------------------------------------


def key_padding(batch, lk, pads, rows=1):
    """Additive bf16 mask [B, rows, Lk]: per batch element, key ranges [start, stop) dropped."""
    keep = torch.ones(batch, rows, lk, dtype=torch.bool, device="cuda")
    for i, (start, stop) in enumerate(pads):
        keep[i, :, start:stop] = False
    zero = torch.zeros((), dtype=BF16, device="cuda")
    return torch.where(keep, zero, torch.tensor(MASK_VALUE, dtype=BF16, device="cuda"))


ATTENTION_CASES = {
    # name: (batch, lq, lk, pads): Pi0 with 3 cameras = 768 image + 48 language tokens
    "prefix": (1, 816, 816, [(773, 816)]),
    "state": (1, 1, 817, [(773, 816)]),
    "suffix": (1, 50, 867, [(773, 816)]),
    "odd_two_batches": (2, 7, 83, [(40, 60), (0, 3)]),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_gemma_mqa(fg, case):
    b, lq, lk, pads = ATTENTION_CASES[case]
    q = randn(b, lq, 8, 256, seed=12, scale=2.0)
    k = randn(b, lk, 1, 256, seed=13, scale=2.0)
    v = randn(b, lk, 1, 256, seed=14)
    mask = key_padding(b, lk, pads)
    out = fg.attention(q, k, v, mask)
    assert_within_bf16(out, native.attention(q, k, v, mask), attention64(q, k, v, mask))


def test_attention_full_mask_rows(fg):
    """The uncached path's [B, Lq, Lk] mask (prefix-LM blocks + causal suffix)."""
    lq = lk = 83
    q, k, v = randn(1, lq, 8, 256, seed=15), randn(1, lk, 1, 256, seed=16), randn(1, lk, 1, 256)
    i = torch.arange(lq, device="cuda")
    keep = (i[None, :] <= torch.maximum(i[:, None], torch.tensor(40, device="cuda")))[None]
    mask = torch.where(keep, 0.0, MASK_VALUE).to(BF16)
    out = fg.attention(q, k, v, mask)
    assert_within_bf16(out, native.attention(q, k, v, mask), attention64(q, k, v, mask))


def test_attention_first_step_state_row(fg):
    """The first denoising step: state + 50 action queries; the state row does not see the
    actions (per-query mask [B, 51, Lk]), every row skips the prompt padding."""
    lq, lk = 51, 867
    q, k, v = randn(1, lq, 8, 256, seed=20), randn(1, lk, 1, 256, seed=21), randn(1, lk, 1, 256)
    mask = key_padding(1, lk, [(773, 816)], rows=lq)
    mask[:, 0, 817:] = MASK_VALUE
    out = fg.attention(q, k, v, mask)
    assert_within_bf16(out, native.attention(q, k, v, mask), attention64(q, k, v, mask))


def test_attention_siglip_hd72_falls_back_to_native(fg):
    q, k, v = (randn(3, 256, 16, 72, seed=s) for s in (17, 18, 19))
    torch.testing.assert_close(fg.attention(q, k, v), native.attention(q, k, v), rtol=0, atol=0)
    assert "native (fallback" in fg.routes["attention"]


# ---- whole model ----------------------------------------------------------------------------


def run_model(ops_name, dtype, preset="tiny", round_to=None, steps=4):
    from flagscale.models.pi0 import PI0Policy
    from flagscale.tools.compare_backends import round_weights

    policy = PI0Policy.random(preset=preset, device="cuda", dtype=dtype, ops=ops_name, seed=0)
    if round_to:
        round_weights(policy.model, round_to)
    obs = policy.example_observation(n_cameras=3, seed=0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(policy.config.chunk_size, policy.config.max_action_dim, generator=g)
    actions = policy.infer(obs, num_steps=steps, noise=noise.numpy())["actions"]
    del policy
    torch.cuda.empty_cache()
    return torch.as_tensor(actions, dtype=torch.float64)


@pytest.mark.parametrize("preset", ["tiny", pytest.param("pi0", marks=pytest.mark.slow)])
def test_whole_model_vs_native(preset):
    steps = 4 if preset == "tiny" else 10
    ref = run_model("native", "float32", preset, round_to="bfloat16", steps=steps)
    base = run_model("native", "bfloat16", preset, steps=steps)
    test = run_model("flaggems", "bfloat16", preset, steps=steps)
    assert torch.isfinite(test).all()
    _, t_rel = errors(test, ref)
    _, n_rel = errors(base, ref)
    _, vs_native = errors(test, base)
    assert t_rel <= 1.5 * n_rel + 1e-3, (t_rel, n_rel)
    assert vs_native <= 0.01 + 2 * n_rel, vs_native
