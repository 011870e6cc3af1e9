"""Fused Triton kernels vs the composed native ops they replace.

On a GPU the kernels run compiled (bf16 tensor-core dots); without one, in Triton's CPU
interpreter (conftest sets TRITON_INTERPRET=1). Reference: the composed ops on fp32 copies of the
same bf16 inputs. A kernel passes when its error against that reference is within 1.5x (+ a
small floor) of the composed bf16 ops' own error: it rounds where they round.
"""

import pytest
import torch

pytest.importorskip("triton")

from flagscale.ops import native_ops  # noqa: E402
from flagscale.ops import fused_routes as fr, triton_fused as tf  # noqa: E402
from flagscale.ops.native import MASK_VALUE, rope_cos_sin  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = torch.bfloat16
OPS = native_ops()
FUSED = OPS.with_fused_kernels()


def rand(*shape, scale=1.0, dtype=BF16, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def rel_l2(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(fused_out, composed_out, reference):
    err_fused, err_composed = rel_l2(fused_out, reference), rel_l2(composed_out, reference)
    assert torch.isfinite(fused_out.float()).all()
    assert err_fused <= 1.5 * err_composed + 2e-4, (err_fused, err_composed)


def f32(*tensors):
    return [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors]


def qkv_case(b, t, width, heads, head_dim, cache_len, start):
    x = rand(b, t, width, scale=2.0)
    norm_w = rand(width, scale=0.3, dtype=torch.float32)
    w = rand((heads + 2) * head_dim, width, scale=width**-0.5)
    positions = torch.arange(t, device=DEVICE)[None].expand(b, t) + start + 3
    cos, sin = rope_cos_sin(positions, head_dim, 10000.0)
    return x, norm_w, w, cos, sin, cache_len, start


@pytest.mark.parametrize(
    "b,t,width,heads,head_dim",
    [
        (1, 50, 1024, 8, 256),  # Pi0's action expert
        (2, 7, 128, 4, 64),
        (1, 1, 256, 2, 128),
        (3, 50, 128, 2, 64),
    ],
)
def test_qkv_rope_matches_composed_and_fills_cache(b, t, width, heads, head_dim):
    x, norm_w, w, cos, sin, cache_len, start = qkv_case(b, t, width, heads, head_dim, 80, 9)

    def run(fn, dtype):
        cache_k = torch.full((b, cache_len, head_dim), 7.0, dtype=dtype, device=DEVICE)
        cache_v = cache_k.clone()
        args = f32(x, norm_w, w, cos, sin) if dtype == torch.float32 else (x, norm_w, w, cos, sin)
        ks, vs = cache_k[:, start : start + t], cache_v[:, start : start + t]
        x_, norm_w_, w_, cos_, sin_ = args
        q = fn(x_, norm_w_, 1e-6, w_, cos_, sin_, heads, 1, head_dim, ks, vs)
        return q, cache_k, cache_v

    q_f, k_f, v_f = run(FUSED.qkv_rope, BF16)
    q_c, k_c, v_c = run(OPS.qkv_rope, BF16)
    q_r, k_r, v_r = run(OPS.qkv_rope, torch.float32)
    check(q_f, q_c, q_r)
    check(k_f, k_c, k_r)
    check(v_f, v_c, v_r)
    outside = torch.ones(cache_len, dtype=torch.bool)
    outside[start : start + t] = False
    assert (k_f[:, outside] == 7.0).all() and (v_f[:, outside] == 7.0).all()  # only its slots


@pytest.mark.parametrize(
    "m,width,ffw", [(50, 256, 128), (3, 128, 64), (100, 128, 256), (200, 128, 64)]
)
def test_norm_geglu_matches_composed(m, width, ffw):
    x = rand(m, width, scale=3.0)
    norm_w = rand(width, scale=0.3, dtype=torch.float32)
    w = rand(2 * ffw, width, scale=width**-0.5)
    check(
        FUSED.norm_geglu(x, norm_w, 1e-6, w),
        OPS.norm_geglu(x, norm_w, 1e-6, w),
        OPS.norm_geglu(*f32(x, norm_w), 1e-6, w.float()),
    )


@pytest.mark.parametrize("m,d", [(768, 1152), (5, 100), (1, 64)])  # SigLIP So400m: 768 x 1152
def test_add_layer_norm_matches_composed(m, d):
    x, y = rand(m, d, scale=4.0, seed=20), rand(m, d, scale=2.0, seed=21)
    w = 1.0 + rand(d, scale=0.2, dtype=torch.float32, seed=22)
    b = rand(d, scale=0.1, dtype=torch.float32, seed=23)
    total, out = FUSED.add_layer_norm(x, y, w, b, 1e-6)
    ref_total, ref_out = OPS.add_layer_norm(x, y, w, b, 1e-6)
    assert torch.equal(total, ref_total)  # the residual stream is rounded like the composed add
    check(out, ref_out, OPS.layer_norm(ref_total.float(), w, b, 1e-6))
    check(out, ref_out, OPS.add_layer_norm(*f32(x, y), w, b, 1e-6)[1])


@pytest.mark.parametrize("split", [1, 2, 4, None])
@pytest.mark.parametrize("m,k,n", [(50, 1024, 128), (1, 512, 64), (128, 256, 192), (300, 256, 64)])
def test_linear_residual_matches_composed(m, k, n, split):
    # a split that does not divide K into 128-wide blocks is lowered until it does
    x, w, res = rand(2, m, k, seed=1), rand(n, k, scale=k**-0.5, seed=2), rand(2, m, n, seed=3)
    x, res = x[:1], res[:1]  # a batch view, like the model's
    out = tf.linear_residual(x, w, res, split=split)
    check(out, OPS.linear_residual(x, w, res), OPS.linear_residual(*f32(x, w, res)))
    # split-K reduces in a fixed order: bitwise repeatable; counters are left at zero
    assert torch.equal(out, tf.linear_residual(x, w, res, split=split))
    assert int(tf._SCRATCH[("count", out.device)].abs().sum()) == 0
    owned = res.clone()  # in place: the same sums, written over the residual
    assert torch.equal(tf.linear_residual(x, w, owned, split=split, inplace=True), out)
    assert torch.equal(owned, out)


@pytest.mark.parametrize("table", ["composed", "fused"])
@pytest.mark.parametrize("m", [50, 300])  # the short kernel; the long path (cuBLAS addmm_)
def test_linear_residual_in_place_equals_out_of_place(table, m):
    ops = OPS if table == "composed" else FUSED
    x, w, res = rand(m, 256, seed=5), rand(128, 256, scale=1 / 16, seed=6), rand(m, 128, seed=7)
    expect = ops.linear_residual(x, w, res)
    owned = res.clone()
    out = ops.linear_residual(x, w, owned, inplace=True)
    assert torch.equal(out, expect) and torch.equal(owned, expect)
    assert out.data_ptr() == owned.data_ptr()


def attention_inputs(b, lq, h, dh, lk, per_query_mask):
    q = rand(b, lq, h, dh, seed=4)
    cache_k, cache_v = rand(b, lk + 5, dh, seed=5), rand(b, lk + 5, dh, seed=6)
    k, v = cache_k[:, :lk, None], cache_v[:, :lk, None]  # strided views, like the cache slices
    allowed = torch.ones(b, lq if per_query_mask else 1, lk, dtype=torch.bool)
    allowed[0, :, 3:17] = False
    if per_query_mask:
        allowed[-1, 1:, lk - 2 :] = False
    mask = torch.zeros(allowed.shape, dtype=BF16).masked_fill_(~allowed, MASK_VALUE).to(DEVICE)
    return q, k, v, mask


@pytest.mark.parametrize("split", [1, 3, None])
@pytest.mark.parametrize(
    "b,lq,h,dh,lk,per_query",
    [(1, 50, 8, 256, 867, False), (1, 50, 2, 64, 300, False), (2, 5, 4, 128, 97, True)],
)
def test_mqa_attention_matches_composed(b, lq, h, dh, lk, per_query, split):
    q, k, v, mask = attention_inputs(b, lq, h, dh, lk, per_query)
    out = tf.mqa_attention(q, k, v, mask, split=split)
    composed = OPS.attention(q, k, v, mask)
    reference = OPS.attention(*f32(q, k, v), mask.float())
    check(out, composed, reference)
    assert int(tf._SCRATCH[("count_attn", out.device)].abs().sum()) == 0


@pytest.mark.parametrize("per_query", [False, True])
def test_mqa_attention_merge_kernel_matches_in_kernel_merge(per_query, monkeypatch):
    """The two ways to merge key splits: the last split to finish, or a second kernel."""
    q, k, v, mask = attention_inputs(2, 7, 4, 128, 200, per_query)
    last = tf.mqa_attention(q, k, v, mask, split=3)
    monkeypatch.setitem(
        tf.CONFIG, "mqa_attention", dict(tf.CONFIG["mqa_attention"], merge="kernel")
    )
    merged = tf.mqa_attention(q, k, v, mask, split=3)
    torch.testing.assert_close(merged, last, rtol=0, atol=0)  # same sums, same order
    check(merged, OPS.attention(q, k, v, mask), OPS.attention(*f32(q, k, v), mask.float()))


def test_long_attention_config_for_the_prefix(monkeypatch):
    """Prefix-sized attention (native table) takes the kernel's long configuration."""
    b, h, dh, lk = 1, 8, 64, 140
    _, k, v, mask = attention_inputs(b, 1, h, dh, lk, False)
    q = rand(b, lk, h, dh, seed=12)  # 1120 query rows: above the short limit
    assert lk * h > fr.MAX_ROWS["mqa_attention"]
    calls = []
    real = tf.mqa_attention
    monkeypatch.setattr(tf, "mqa_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    out = fr.dispatchers(OPS)["attention"](q, k, v, mask)
    assert calls == [{"config": "mqa_attention_long"}]
    check(out, OPS.attention(q, k, v, mask), OPS.attention(*f32(q, k, v), mask.float()))


def test_short_attention_config_by_batch(monkeypatch):
    """One sample takes `mqa_attention`; batches (the five-kernel expert path at 2+ robots)
    `mqa_attention_batch`: tiles measured per case."""
    calls = []
    real = tf.mqa_attention
    spy = lambda *a, **kw: calls.append(kw["config"]) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(tf, "mqa_attention", spy)
    attention = fr.dispatchers(OPS)["attention"]
    for b in (1, 2):
        q, k, v, mask = attention_inputs(b, 7, 4, 64, 90, False)
        expect = OPS.attention(q, k, v, mask)
        check(attention(q, k, v, mask), expect, OPS.attention(*f32(q, k, v), mask.float()))
    assert calls == ["mqa_attention", "mqa_attention_batch"]


def test_qkv_rope_config_by_batch(monkeypatch):
    """Batches take `qkv_rope_batch` where its tiles divide the head; one sample `qkv_rope`."""
    calls = []
    real = tf.qkv_rope
    spy = lambda *a, **kw: calls.append(kw["config"]) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(tf, "qkv_rope", spy)
    fused = fr.dispatchers(OPS)["qkv_rope"]
    for b, head_dim in ((1, 64), (2, 64), (2, 32)):  # 32: a half head narrower than the tile
        x, norm_w, w, cos, sin, cache_len, start = qkv_case(b, 5, 128, 2, head_dim, 20, 3)
        k_out = torch.zeros(b, 5, head_dim, dtype=BF16, device=DEVICE)
        fused(x, norm_w, 1e-6, w, cos, sin, 2, 1, head_dim, k_out, k_out.clone())
    assert calls == ["qkv_rope", "qkv_rope_batch", "qkv_rope"]


def test_attention_with_strided_queries_and_long_fallback():
    b, lq, h, dh, lk = 1, 20, 8, 64, 130
    qk = rand(b, lq, h + 1, dh, seed=10)
    q = qk[:, :, :h]  # non-contiguous, like the composed qkv_rope's output
    _, k, v, mask = attention_inputs(b, 1, h, dh, lk, False)
    out = FUSED.attention(q, k, v, mask)
    check(out, OPS.attention(q, k, v, mask), OPS.attention(*f32(q, k, v), mask.float()))
    long_q = rand(b, fr.MAX_ROWS["mqa_attention"] // h + 1, h, dh, seed=11)
    other = native_ops()
    other.backend = "flaggems"  # another backend keeps its own attention for the prefix
    expect = OPS.attention(long_q, k, v, mask)
    assert torch.equal(fr.dispatchers(other)["attention"](long_q, k, v, mask), expect)


@pytest.mark.parametrize("op", ["qkv_rope", "norm_geglu", "linear_residual"])
def test_long_inputs_take_the_row_kernels_around_cublas(op):
    """Prefix-sized inputs (more rows than the fused GEMMs take): RMSNorm / RoPE+scatter / GeGLU
    row kernels around cuBLAS, and one addmm for linear + residual."""
    rows = {"qkv_rope": 520, "norm_geglu": 260, "linear_residual": 65}[op]
    assert rows > fr.MAX_ROWS[op]
    if op == "qkv_rope":
        b, t, width, heads, head_dim = 1, rows, 128, 2, 64
        x, norm_w, w, cos, sin, cache_len, start = qkv_case(b, t, width, heads, head_dim, 540, 4)

        def run(fn, *args):
            k = torch.zeros(b, cache_len, head_dim, dtype=args[0].dtype, device=DEVICE)
            v = torch.zeros_like(k)
            ks, vs = k[:, start : start + t], v[:, start : start + t]
            x_, n_, w_, c_, s_ = args
            return fn(x_, n_, 1e-6, w_, c_, s_, heads, 1, head_dim, ks, vs), ks, vs

        fused = run(FUSED.qkv_rope, x, norm_w, w, cos, sin)
        composed = run(OPS.qkv_rope, x, norm_w, w, cos, sin)
        reference = run(OPS.qkv_rope, *f32(x, norm_w, w, cos, sin))
        for f, c, r in zip(fused, composed, reference):
            check(f, c, r)
        return
    if op == "norm_geglu":
        x, norm_w = rand(rows, 128, scale=3.0), rand(128, scale=0.3, dtype=torch.float32)
        w = rand(2 * 64, 128, scale=128**-0.5)
        args = (x, norm_w, 1e-6, w)
        ref_args = (*f32(x, norm_w), 1e-6, w.float())
    else:
        x, w, res = rand(rows, 256, seed=1), rand(128, 256, scale=1 / 16, seed=2), rand(rows, 128)
        args, ref_args = (x, w, res), tuple(f32(x, w, res))
    check(getattr(FUSED, op)(*args), getattr(OPS, op)(*args), getattr(OPS, op)(*ref_args))


def test_fp32_inputs_use_the_composed_ops():
    x = rand(2, 5, 128, seed=7, dtype=torch.float32)
    w = rand(128, 128, scale=0.1, seed=8, dtype=torch.float32)
    norm_w = torch.zeros(128, device=DEVICE)
    assert torch.equal(FUSED.linear_residual(x, w, x), OPS.linear_residual(x, w, x))
    assert torch.equal(FUSED.norm_geglu(x, norm_w, 1e-6, w), OPS.norm_geglu(x, norm_w, 1e-6, w))


def test_table_describes_fused_kernels():
    assert not OPS.fused and "fused" not in OPS.describe()
    assert set(FUSED.fused) == {
        "qkv_rope",
        "norm_geglu",
        "linear_residual",
        "attention",
        "add_layer_norm",
        "decoder_layer",
        "linear_gelu",
    }
    assert "decoder_layer" not in OPS.with_fused_kernels(persistent_layers=False).fused
    adaptive = OPS.with_fused_kernels(adaptive=True).fused  # Pi0.5's, fused_kernels: true only
    assert set(adaptive) == set(FUSED.fused) | set(fr.ADAPTIVE)
    assert "fused Triton kernels" in FUSED.describe()
    assert FUSED.with_fused_kernels  # a table can be rebuilt; backend unchanged
    assert FUSED.backend == "native"


def test_folded_weight_follows_in_place_updates():
    w = rand(64, 128, seed=9)
    norm_w = torch.zeros(128, device=DEVICE)
    first = tf.folded_weight(w, norm_w)
    assert torch.equal(first, w) and tf.folded_weight(w, norm_w) is first  # cached
    norm_w.fill_(1.0)  # e.g. weights loaded after a first call
    assert torch.equal(tf.folded_weight(w, norm_w), (w.float() * 2).to(BF16))


def test_fused_ops_are_opaque_to_torch_compile():
    """engine.compile must not trace into the kernels (an H200 run that did crashed)."""
    x, w, res = rand(1, 50, 256, seed=12), rand(128, 256, scale=1 / 16, seed=13), rand(1, 50, 128)

    def fn(a, b, c):
        return FUSED.linear_residual(a, b, c) * 2

    # traced into, the kernels fail under dynamo (here: inside Triton's interpreter); opaque,
    # they run eagerly between the compiled pieces
    assert torch.equal(torch.compile(fn, backend="eager")(x, w, res), fn(x, w, res))


def layer_case(b, t, width, heads, head_dim, ffw, start):
    """A decoder layer's inputs: weights, RoPE tables, a cache whose first `start` slots hold a
    prefix, and an additive mask over start + t keys with a few masked prefix keys."""
    weights = (
        rand(width, scale=0.3, dtype=torch.float32, seed=30),
        rand((heads + 2) * head_dim, width, scale=width**-0.5, seed=31),
        rand(width, heads * head_dim, scale=(heads * head_dim) ** -0.5, seed=32),
        rand(width, scale=0.3, dtype=torch.float32, seed=33),
        rand(2 * ffw, width, scale=width**-0.5, seed=34),
        rand(width, ffw, scale=ffw**-0.5, seed=35),
    )
    x = rand(b, t, width, scale=2.0, seed=36)
    positions = torch.arange(t, device=DEVICE)[None].expand(b, t) + start
    cos, sin = rope_cos_sin(positions, head_dim, 10000.0)
    cache_k, cache_v = rand(b, start + t + 3, head_dim, seed=37), rand(b, start + t + 3, head_dim)
    allowed = torch.ones(b, 1, start + t, dtype=torch.bool)
    allowed[0, :, 2:6] = False
    mask = torch.zeros(allowed.shape, dtype=BF16).masked_fill_(~allowed, MASK_VALUE).to(DEVICE)
    return x, weights, cos, sin, cache_k, cache_v, mask


def layer_by_ops(ops, x, weights, cos, sin, cache_k, cache_v, start, mask, heads, head_dim):
    """The layer as GemmaLayer composes it: qkv -> attention -> o_proj -> GeGLU MLP."""
    input_norm, w_qkv, w_o, ffw_norm, w_gu, w_down = weights
    end = start + x.shape[1]
    q = ops.qkv_rope(
        x, input_norm, 1e-6, w_qkv, cos, sin, heads, 1, head_dim,
        cache_k[:, start:end], cache_v[:, start:end],
    )  # fmt: skip
    attn = ops.attention(q, cache_k[:, :end, None], cache_v[:, :end, None], mask)
    h = ops.linear_residual(attn, w_o, x)
    return ops.linear_residual(ops.norm_geglu(h, ffw_norm, 1e-6, w_gu), w_down, h)


@pytest.mark.parametrize(
    "b,t,width,heads,head_dim,ffw,start",
    [(1, 51, 256, 2, 128, 512, 40), (2, 7, 128, 4, 64, 256, 20), (3, 50, 128, 2, 64, 256, 9)],
)  # the last: 150 rows, two row tiles
def test_decoder_layer_equals_the_five_fused_ops(b, t, width, heads, head_dim, ffw, start):
    """One persistent launch runs the same tiles as the five kernels: bit-identical outputs and
    caches; within the composed ops' error of an fp32 reference; scratch counters left at 0."""
    x, weights, cos, sin, cache_k, cache_v, mask = layer_case(
        b, t, width, heads, head_dim, ffw, start
    )
    args = (cos, sin)
    k_layer, v_layer = cache_k.clone(), cache_v.clone()
    out = tf.decoder_layer(x, weights, 1e-6, *args, k_layer, v_layer, start, mask, heads, head_dim)
    cfg = tf.CONFIG["decoder_layer"]
    attn_cfg = dict(tf.CONFIG["mqa_attention"], br=cfg["br"], bkv=cfg["bkv"], merge="kernel")
    k_ops, v_ops = cache_k.clone(), cache_v.clone()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("mqa_attention", "mqa_attention_batch"):  # one sample / batches
            mp.setitem(tf.CONFIG, name, dict(attn_cfg, split=cfg["a_split"]))
        mp.setitem(tf.CONFIG, "qkv_rope_batch", dict(tf.CONFIG["qkv_rope"]))  # the layer's tiles
        mp.setitem(fr.MAX_ROWS, "linear_residual", 1024)
        mp.setitem(fr.MAX_ROWS, "norm_geglu", 1024)
        by_ops = layer_by_ops(FUSED, x, weights, *args, k_ops, v_ops, start, mask, heads, head_dim)
    torch.testing.assert_close(out, by_ops, rtol=0, atol=0)
    torch.testing.assert_close(k_layer, k_ops, rtol=0, atol=0)
    torch.testing.assert_close(v_layer, v_ops, rtol=0, atol=0)
    composed = layer_by_ops(OPS, x, weights, *args, cache_k.clone(), cache_v.clone(), start, mask,
                            heads, head_dim)  # fmt: skip
    ref_args = f32(x, *weights, cos, sin, cache_k, cache_v, mask)
    reference = layer_by_ops(
        OPS, ref_args[0], ref_args[1:7], *ref_args[7:11], start, ref_args[11], heads, head_dim
    )
    check(out, composed, reference)
    assert int(tf._SCRATCH[("count", out.device)].abs().sum()) == 0
    # barrier counters: all re-armed but the last one, which the next launch re-arms
    bars = tf._SCRATCH[("barriers", out.device)][: tf.N_BARRIERS.value].tolist()
    assert bars[:-1] == [0] * (len(bars) - 1) and bars[-1] > 0


def test_linear_gelu_matches_composed():
    """SigLIP's fc1 + GELU (on a GPU: one cuBLASLt call with a GELU epilogue)."""
    x, w = rand(300, 128, seed=70), rand(256, 128, scale=128**-0.5, seed=71)
    b = rand(256, scale=0.5, seed=72)
    out = FUSED.linear_gelu(x, w, b)
    check(out, OPS.linear_gelu(x, w, b), OPS.linear_gelu(*f32(x, w, b)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_linear_gelu_epilogue_is_the_tanh_approximation():
    """fp32 through the same cuBLASLt epilogue: equal to gelu(approximate="tanh") to fp32
    rounding, and measurably apart from the exact (erf) GELU that SigLIP does not use."""
    x = torch.randn(256, 128, device="cuda")
    w = torch.randn(512, 128, device="cuda") * 128**-0.5 * 2
    b = torch.randn(512, device="cuda")
    out = tf.long_linear_gelu(x, w, b)
    pre = torch.nn.functional.linear(x, w, b)
    tanh = torch.nn.functional.gelu(pre, approximate="tanh")
    exact = torch.nn.functional.gelu(pre)
    assert (out - tanh).abs().max().item() < 2e-5
    assert (out - exact).abs().max().item() > 1e-4


# ---- Pi0.5's adaptive ops (fused_kernels: true only) -------------------------------------------

ADA = OPS.with_fused_kernels(adaptive=True)
FP16 = torch.float16


def modulation(b, width, dtype=torch.float32, seed=40):
    """scale, shift, gate [B, 1, W]: strided views of one norm's row of a modulation tensor, as
    `PI0Model.modulation` makes them (fp32; the gate cast to x's dtype by the layer)."""
    mod = rand(b, 3, 3 * width, scale=0.5, dtype=torch.float32, seed=seed).to(dtype)
    return mod[:, None, 1].chunk(3, dim=-1)


def ulps(out, ref):
    """|out - ref| in units of ref's last place in out's dtype (spacing at |ref|)."""
    _, exponent = torch.frexp(ref.float())
    spacing = torch.ldexp(torch.ones_like(ref.float()), exponent - 1) * torch.finfo(out.dtype).eps
    spacing = spacing.clamp_min(torch.finfo(out.dtype).smallest_normal)
    return ((out.float() - ref.float()).abs() / spacing).max().item()


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("mod_dtype", [torch.float32, "x"])
@pytest.mark.parametrize("b,t,d", [(2, 50, 128), (1, 3, 100), (3, 1, 1024)])
def test_ada_rms_norm_kernel_matches_native(b, t, d, dtype, mod_dtype):
    """One row kernel, the native op's fp32 math and one rounding: equal but for one ulp where
    the sum of squares (or 1 / sqrt vs rsqrt) lands across a rounding boundary."""
    x = rand(b, t, d, scale=3.0, dtype=dtype, seed=41)
    scale, shift, _ = modulation(b, d, dtype if mod_dtype == "x" else mod_dtype)
    out = tf.ada_rms_norm(x, scale, shift, 1e-6)
    ref = OPS.ada_rms_norm(x, scale, shift, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert ulps(out, ref) <= 1
    assert (out == ref).float().mean() > 0.99
    assert torch.equal(ADA.ada_rms_norm(x, scale, shift, 1e-6), out)  # the route takes it


def ada_qkv_run(fn, x, scale, shift, w, cos, sin, heads, head_dim, dtype, start=4, pad=9):
    b, t, _ = x.shape
    cache_k = torch.full((b, start + t + pad, head_dim), 7.0, dtype=dtype, device=DEVICE)
    cache_v = cache_k.clone()
    ks, vs = cache_k[:, start : start + t], cache_v[:, start : start + t]
    args = (x, scale, shift, w, cos, sin)
    if dtype == torch.float32:
        args = f32(*args)
    x_, scale_, shift_, w_, cos_, sin_ = args
    q = fn(x_, scale_, shift_, 1e-6, w_, cos_, sin_, heads, 1, head_dim, ks, vs)
    return q, cache_k, cache_v


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("b,t,width,heads,head_dim", [(1, 50, 256, 2, 128), (2, 7, 128, 4, 64)])
def test_ada_qkv_rope_matches_composed(b, t, width, heads, head_dim, dtype, monkeypatch):
    x, _, _, cos, sin, _, _ = qkv_case(b, t, width, heads, head_dim, 0, 5)
    x = x.to(dtype)
    w = rand((heads + 2) * head_dim, width, scale=width**-0.5, dtype=dtype)
    scale, shift, _ = modulation(b, width)
    calls, real = [], tf.qkv_rope
    spy = lambda *a, **kw: calls.append(a[1]) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(tf, "qkv_rope", spy)
    fused = ada_qkv_run(ADA.ada_qkv_rope, x, scale, shift, w, cos, sin, heads, head_dim, dtype)
    assert calls == [None]  # the projection kernel without its norm
    composed = ada_qkv_run(OPS.ada_qkv_rope, x, scale, shift, w, cos, sin, heads, head_dim, dtype)
    reference = ada_qkv_run(OPS.ada_qkv_rope, x, scale, shift, w, cos, sin, heads, head_dim,
                            torch.float32)  # fmt: skip
    for f, c, r in zip(fused, composed, reference):
        check(f, c, r)
    outside = torch.ones(fused[1].shape[1], dtype=torch.bool)
    outside[4 : 4 + t] = False
    assert (fused[1][:, outside] == 7.0).all() and (fused[2][:, outside] == 7.0).all()


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("b,t,width,ffw", [(1, 50, 256, 128), (3, 4, 128, 64)])
def test_ada_norm_geglu_matches_composed(b, t, width, ffw, dtype):
    x = rand(b, t, width, scale=3.0, dtype=dtype, seed=42)
    w = rand(2 * ffw, width, scale=width**-0.5, dtype=dtype, seed=43)
    scale, shift, _ = modulation(b, width)
    out = ADA.ada_norm_geglu(x, scale, shift, 1e-6, w)
    assert out.shape == (b, t, ffw) and out.dtype == dtype
    composed = OPS.ada_norm_geglu(x, scale, shift, 1e-6, w)
    check(out, composed, OPS.ada_norm_geglu(*f32(x, scale, shift), 1e-6, w.float()))


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("b,t,k,n", [(1, 50, 256, 128), (2, 7, 512, 64)])
def test_linear_gated_residual_matches_composed(b, t, k, n, split, dtype):
    """residual + bf16(bf16(x @ W^T) * gate), the composed ops' roundings; in place too."""
    x, w = rand(b, t, k, dtype=dtype, seed=44), rand(n, k, scale=k**-0.5, dtype=dtype, seed=45)
    res = rand(b, t, n, scale=2.0, dtype=dtype, seed=46)
    gate = modulation(b, n)[2].to(dtype)
    out = tf.linear_residual(x, w, res, split=split, gate=gate)
    reference = OPS.linear_gated_residual(*f32(x, w, res, gate))
    check(out, OPS.linear_gated_residual(x, w, res, gate), reference)
    assert int(tf._SCRATCH[("count", out.device)].abs().sum()) == 0
    owned = res.clone()  # in place (the route): the same sums, written over the residual
    routed = ADA.linear_gated_residual(x, w, owned, gate, inplace=True)
    assert routed.data_ptr() == owned.data_ptr() and torch.equal(owned, out)
    assert torch.equal(ADA.linear_gated_residual(x, w, res, gate), out)


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_gated_residual_epilogue_rounds_like_the_composed_ops(dtype):
    """With an identity weight the product is exact in any summation order: the kernel's
    epilogue must then equal the composed ops bit for bit (product, gated branch, sum)."""
    b, t, n = 2, 9, 128
    x, res = rand(b, t, n, scale=3.0, dtype=dtype, seed=47), rand(b, t, n, dtype=dtype, seed=48)
    eye = torch.eye(n, dtype=dtype, device=DEVICE)
    gate = modulation(b, n)[2].to(dtype)
    out = tf.linear_gated_residual(x, eye, res, gate)
    assert torch.equal(out, OPS.linear_gated_residual(x, eye, res, gate))
    assert not torch.equal(out, res + x)  # the gate is applied


@pytest.mark.parametrize("fused,adaptive", [("auto", False), ("true", True), (True, True)])
def test_adaptive_kernels_only_when_fused_kernels_is_true(fused, adaptive):
    """The rule (`build_ops`): "auto" keeps Pi0.5's composed adaptive ops; true adds the
    kernels. (The device is only a name here: the tables are built, not run.)"""
    from flagscale.ops import build_ops

    table = build_ops("native", device="cuda", fused=fused)
    assert {"qkv_rope", "norm_geglu", "linear_residual", "attention"} <= set(table.fused)
    assert (set(fr.ADAPTIVE) <= set(table.fused)) == adaptive
    assert not set(fr.ADAPTIVE) & set(table.fused) or adaptive
    expect = table.fused["ada_qkv_rope"] if adaptive else table.composed["ada_qkv_rope"]
    assert table.ada_qkv_rope is expect


def test_adaptive_routes_fall_back_to_the_composites(monkeypatch):
    """fp32 inputs, more rows than MAX_ROWS, widths the tiles do not cover, a gate that is not
    one row per sample: the composed ops, bit for bit, and no adaptive kernel runs."""
    calls = []
    for name in ("ada_rms_norm", "ada_qkv_rope", "ada_norm_geglu", "linear_gated_residual"):
        real = getattr(tf, name)
        spy = lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw)  # noqa
        monkeypatch.setattr(tf, name, spy)
    s, h, g = modulation(2, 128)
    x32, w = rand(2, 5, 128, dtype=torch.float32, seed=50), rand(128, 128, scale=0.1, seed=51)
    assert torch.equal(ADA.ada_rms_norm(x32, s, h), OPS.ada_rms_norm(x32, s, h))
    args = (x32, s, h, 1e-6, w.float())
    assert torch.equal(ADA.ada_norm_geglu(*args), OPS.ada_norm_geglu(*args))
    args = (rand(2, fr.MAX_ROWS["ada_norm_geglu"] // 2 + 1, 128, seed=52), s, h, 1e-6, w)
    assert torch.equal(ADA.ada_norm_geglu(*args), OPS.ada_norm_geglu(*args))
    x100, s100, h100, _ = rand(2, 3, 100, seed=53), *modulation(2, 100)
    w_qkv = rand(4 * 32, 100, scale=0.1, seed=54)
    cos, sin = rope_cos_sin(torch.arange(3)[None].expand(2, 3).to(DEVICE), 32, 10000.0)
    kv = [torch.zeros(2, 3, 32, dtype=BF16, device=DEVICE) for _ in range(4)]
    q = ADA.ada_qkv_rope(x100, s100, h100, 1e-6, w_qkv, cos, sin, 2, 1, 32, kv[0], kv[1])
    expect = OPS.ada_qkv_rope(x100, s100, h100, 1e-6, w_qkv, cos, sin, 2, 1, 32, kv[2], kv[3])
    assert torch.equal(q, expect) and torch.equal(kv[0], kv[2]) and torch.equal(kv[1], kv[3])
    x, res, gate = rand(2, 5, 128, seed=55), rand(2, 5, 128, seed=56), g[:1].to(BF16)
    args = (x, w, res, gate)  # one gate broadcast over the batch
    assert torch.equal(ADA.linear_gated_residual(*args), OPS.linear_gated_residual(*args))
    assert calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("b", [1, 4])
def test_adaptive_kernels_compiled_at_the_expert_size(b):
    """Compiled (tensor-core dots), Pi0.5's action expert (width 1024, 8 x 256 heads, mlp 4096,
    50 tokens): each adaptive op within the composed ops' error of an fp32 reference."""
    t, width, heads, head_dim, mlp = 50, 1024, 8, 256, 4096
    x = rand(b, t, width, scale=2.0, seed=60)
    scale, shift, gate = modulation(b, width)
    out = ADA.ada_rms_norm(x, scale, shift)
    assert ulps(out, OPS.ada_rms_norm(x, scale, shift)) <= 1
    positions = torch.arange(t, device=DEVICE)[None].expand(b, t) + 7
    cos, sin = rope_cos_sin(positions, head_dim, 10000.0)
    w_qkv = rand((heads + 2) * head_dim, width, scale=width**-0.5, seed=61)
    cases = ((ADA.ada_qkv_rope, BF16), (OPS.ada_qkv_rope, BF16), (OPS.ada_qkv_rope, torch.float32))
    runs = [
        ada_qkv_run(fn, x, scale, shift, w_qkv, cos, sin, heads, head_dim, dtype)
        for fn, dtype in cases
    ]
    for fused, composed, reference in zip(*runs):
        check(fused, composed, reference)
    w_gu = rand(2 * mlp, width, scale=width**-0.5, seed=62)
    args = (x, scale, shift, 1e-6, w_gu)
    act = ADA.ada_norm_geglu(*args)
    check(act, OPS.ada_norm_geglu(*args), OPS.ada_norm_geglu(*f32(*args)))
    w_down, g = rand(width, mlp, scale=mlp**-0.5, seed=63), gate.to(BF16)
    args = (act, w_down, x, g)
    out = ADA.linear_gated_residual(*args)
    check(out, OPS.linear_gated_residual(*args), OPS.linear_gated_residual(*f32(*args)))
    assert int(tf._SCRATCH[("count", out.device)].abs().sum()) == 0
