"""FP8 (e4m3) prefix GEMMs: opt-in `engine.precision: fp8` (Hopper or newer, fused kernels).

The prefix (SigLIP and the Gemma-2B pass over ~816 tokens) is GEMM-bound at near the bf16 peak;
Hopper's FP8 rate is twice that. With `precision="fp8"` the Gemma-2B MLP weights (`prefix_weights`)
get an e4m3 copy with one fp32 scale per output channel (`enable`); at run time each activation
row gets its own scale (per token) and the GEMM is `torch._scaled_mm` with both scale vectors,
fp32 accumulation and a bf16 result. Everything else (SigLIP, attention projections, the action
expert) keeps bf16. Scales: amax / 448 (e4m3's largest finite value), so every row uses the
format's whole range and nothing saturates.

`quantize_rows` is the spec (plain torch); on CUDA the same rounding runs as one Triton kernel
(`triton_fused.quantize_rows`).
"""

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
MIN_ROWS = 128  # shorter inputs (the expert, the action heads) keep bf16
PRECISIONS = ("bf16", "fp8")


def quantize_rows(x: torch.Tensor):
    """x [..., K] -> (e4m3 values [..., K], fp32 scales [..., 1]) with x ~= values * scales. One
    scale per row: amax(|row|) / 448 (an all-zero row gets a tiny scale and zero values)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp_min(1e-12) / E4M3_MAX
    values = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return values, scale


def _quantize_activations(x2):
    if x2.is_cuda:
        from flagscale.ops import triton_fused

        return triton_fused.quantize_rows(x2)
    return quantize_rows(x2)


def has_fp8(weight: torch.Tensor) -> bool:
    return getattr(weight, "fp8", None) is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) through the e4m3 copy of `weight` (see `enable`); bf16 out."""
    w_values, w_scale = weight.fp8
    k, n = x.shape[-1], w_values.shape[0]
    xq, x_scale = _quantize_activations(x.reshape(-1, k).contiguous())
    if bias is not None:
        bias = bias.to(torch.bfloat16)
    out = torch._scaled_mm(
        xq, w_values.t(), scale_a=x_scale, scale_b=w_scale.t(), bias=bias, out_dtype=torch.bfloat16
    )
    return out.view(*x.shape[:-1], n)


def prefix_weights(model):
    """The weights that get e4m3 copies: the Gemma-2B MLP's gate|up and down projections, the
    prefix GEMMs where FP8 pays (H200, 816 rows, GEMM alone: gate|up 156 -> 108 us, down 84 -> 53
    us); q|k|v, o_proj and SigLIP's GEMMs ran no faster in FP8 and would pay the activation
    quantization for nothing."""
    weights = []
    for layer in model.llm.layers:
        weights += [layer.gate_up_proj.weight, layer.down_proj.weight]
    return weights


@torch.no_grad()
def enable(model) -> int:
    """Give every prefix weight its e4m3 copy + per-channel scales (`weight.fp8`); the bf16
    weights stay (the expert and any fallback use them). Returns the bytes added."""
    added = 0
    for weight in prefix_weights(model):
        values, scale = quantize_rows(weight.detach())
        weight.fp8 = (values, scale)
        added += values.numel() + scale.numel() * 4
    return added


def check_precision(precision: str, device: torch.device, fused: bool) -> str:
    """Validate `engine.precision`: "bf16" anywhere; "fp8" on a CUDA GPU with compute capability
    8.9+ and the fused kernels (the prefix's long-input path is where FP8 is wired in)."""
    value = str(precision or "bf16").lower()
    if value not in PRECISIONS:
        raise ValueError(f"engine.precision must be one of {PRECISIONS}, got {precision!r}")
    if value == "fp8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError("engine.precision=fp8 needs an NVIDIA GPU with FP8 (sm_89 or newer)")
        if not fused:
            raise ValueError("engine.precision=fp8 needs the fused kernels (engine.fused_kernels)")
    return value
