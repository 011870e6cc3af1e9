"""FP8 (e4m3) prefix GEMMs (`engine.precision: fp8`): the quantization spec and its plumbing on the
CPU; the Triton quantizer and the whole model on a GPU (marked `gpu`, skipped without one)."""

import pytest
import torch
import torch.nn.functional as F

from reference_ops import dequantize_rows

from flagscale.models.pi0 import PI0Policy
from flagscale.ops import fp8, native_ops

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason="needs an FP8 GPU (sm_89 or newer)")


def _scaled_mm_device():
    """Where torch._scaled_mm runs here: an FP8 GPU, else the CPU if this torch build has it."""
    if FP8_GPU:
        return "cuda"
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16))
    except (RuntimeError, NotImplementedError):
        return None
    return "cpu"


MM_DEVICE = _scaled_mm_device()
needs_scaled_mm = pytest.mark.skipif(MM_DEVICE is None, reason="no torch._scaled_mm here")


def _rows(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]  # rows of any scale
    return x.to(torch.bfloat16)


def test_quantize_rows_within_e4m3_rounding():
    x = _rows(64, 96)
    values, scale = fp8.quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    xf = x.float()
    torch.testing.assert_close(scale, xf.abs().amax(-1, keepdim=True) / 448.0)
    assert torch.equal(values.float().abs().amax(-1), torch.full((64,), 448.0))  # whole range
    err = (dequantize_rows(values, scale) - xf).abs()
    # 3 mantissa bits: half an ulp is 2^-4 of the value; subnormals (below 2^-6) step by 2^-9
    assert (err <= xf.abs() * 2.0**-4 + scale * 2.0**-10).all()


def test_quantize_rows_zero_row():
    values, scale = fp8.quantize_rows(torch.zeros(2, 32))
    assert torch.equal(values.float(), torch.zeros(2, 32)) and (scale > 0).all()


@needs_scaled_mm
def test_linear_matches_dequantized_product():
    x, w = _rows(160, 64, 1).to(MM_DEVICE), _rows(48, 64, 2).to(MM_DEVICE)
    bias = torch.randn(48).to(torch.bfloat16).to(MM_DEVICE)
    w.fp8 = fp8.quantize_rows(w)
    out = fp8.linear(x.view(2, 80, 64), w, bias)
    assert out.shape == (2, 80, 48) and out.dtype == torch.bfloat16
    xq = dequantize_rows(*fp8.quantize_rows(x)).double()
    ref = xq @ dequantize_rows(*w.fp8).double().t() + bias.double()
    torch.testing.assert_close(
        out.view(160, 48).double(), ref, rtol=1e-2, atol=1e-2 * float(ref.std())
    )
    exact = x.double() @ w.double().t() + bias.double()
    rel = ((out.view(160, 48).double() - exact).norm() / exact.norm()).item()
    assert rel < 0.06, rel  # e4m3 on both operands: a few percent per GEMM


@needs_scaled_mm
def test_ops_with_fp8_routes_long_inputs_of_quantized_weights():
    ops = native_ops().with_fp8()
    w, plain = _rows(32, 64, 3).to(MM_DEVICE), _rows(32, 64, 4).to(MM_DEVICE)
    w.fp8 = fp8.quantize_rows(w)
    long_x = _rows(fp8.MIN_ROWS, 64, 5).to(MM_DEVICE)
    short_x = _rows(fp8.MIN_ROWS - 1, 64, 6).to(MM_DEVICE)
    assert torch.equal(ops.linear(long_x, w), fp8.linear(long_x, w))
    assert torch.equal(ops.linear(short_x, w), F.linear(short_x, w))  # the expert's rows
    assert torch.equal(ops.linear(long_x, plain), F.linear(long_x, plain))  # no e4m3 copy
    assert "linear" in ops.describe()


def test_enable_quantizes_prefix_weights_only():
    policy = PI0Policy.random("tiny", device="cpu", dtype="bfloat16")
    model = policy.model
    added = fp8.enable(model)
    c = model.config
    weights = fp8.prefix_weights(model)
    assert len(weights) == 2 * c.llm.depth
    assert added == sum(w.numel() + w.shape[0] * 4 for w in weights)
    for w in weights:
        values, scale = w.fp8
        assert values.shape == w.shape and scale.shape == (w.shape[0], 1)
    assert not any(fp8.has_fp8(p) for p in model.expert.parameters())
    assert not any(fp8.has_fp8(p) for p in model.vision.parameters())
    assert not fp8.has_fp8(model.llm.layers[0].qkv_proj.weight)


def test_precision_is_checked_where_the_model_is_built():
    with pytest.raises(ValueError, match="engine.precision must be one of"):
        fp8.check_precision("fp16", torch.device("cpu"), fused=True)
    with pytest.raises(ValueError, match="engine.precision=fp8 needs an NVIDIA GPU"):
        PI0Policy.random("tiny", device="cpu", precision="fp8")
    assert fp8.check_precision(None, torch.device("cpu"), fused=False) == "bf16"


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("k", [96, 16384 + 64])
def test_triton_quantize_rows_matches_spec(k):
    from flagscale.ops import triton_fused

    x = _rows(300, k, 7).cuda()
    values, scale = triton_fused.quantize_rows(x)
    ref_values, ref_scale = fp8.quantize_rows(x)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    # x / scale may differ from torch's division in the last fp32 bit: at most one e4m3 step
    diff = (values.float() - ref_values.float()).abs()
    assert (diff <= ref_values.float().abs() * 2.0**-3 + 2.0**-9).all()
    assert (diff > 0).float().mean() < 1e-3


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("batch", [1, 3])  # 3: 288 prefix rows, gate|up on the long path too
def test_fp8_policy_close_to_bf16_and_graph_safe(batch):
    kw = dict(device="cuda", dtype="bfloat16", seed=0)
    ref = PI0Policy.random("tiny", **kw)
    cand = PI0Policy.random("tiny", precision="fp8", **kw)
    assert "linear" in cand.model.ops.describe()
    obs = [ref.example_observation(n_cameras=3, seed=i) for i in range(batch)]
    inputs = ref.preprocess(obs)
    inputs["noise"] = ref.make_noise([None] * batch, list(range(batch)))
    with torch.inference_mode():
        a = ref.model.sample_actions(**inputs, num_steps=4).float()
        b = cand.model.sample_actions(**inputs, num_steps=4).float()
        cand.enable_cuda_graphs([batch])
        c = cand.sampler(**inputs, num_steps=4).float()
    rel = ((b - a).norm() / a.norm()).item()
    assert torch.isfinite(b).all() and 0 < rel < 0.1, rel
    torch.testing.assert_close(c, b, rtol=0, atol=0)  # the graph replays the same kernels
