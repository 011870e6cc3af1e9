"""`GemmaLayer.forward_reference` (the layer in plain primitives, used by the uncached path)
against the cached / composed layer the server runs (Pi0's fixed norms and Pi0.5's adaptive ones).
"""

import pytest
import torch

from flagscale.models.pi0 import PI0Policy
from flagscale.models.pi0.modeling_pi0 import additive_mask, rope_cos_sin


def layer_inputs(model, layer, batch=2, tokens=5):
    d = layer.dims
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, d.width, generator=g).to(model.dtype)
    positions = 3 + torch.arange(tokens)[None].expand(batch, tokens)
    cos, sin = rope_cos_sin(positions, d.head_dim, model.config.rope_theta)
    allowed = torch.ones(batch, tokens, tokens, dtype=torch.bool)
    allowed[1, :, -2:] = False  # the second sample's last two keys are padding
    mod = None
    if layer.adaptive:
        mod = model.modulation(torch.tensor([0.7, 0.3])[:batch])[:, :2]  # layer 0's rows
    return x, cos, sin, additive_mask(allowed, model.dtype), mod


@pytest.mark.parametrize("preset", ["tiny", "pi05_tiny"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_reference_matches_the_cached_layer(preset, dtype):
    model = PI0Policy.random(preset, device="cpu", dtype=dtype).model
    layer = model.expert.layers[0]
    assert layer.adaptive == model.config.pi05
    x, cos, sin, mask, mod = layer_inputs(model, layer)
    want = layer.forward_reference(x, cos, sin, mask, mod)
    # the server's path: the tokens at cache slots [0, T), composed ops, K/V through the cache
    d = layer.dims
    cache_k = torch.zeros(x.shape[0], x.shape[1], d.kv_heads * d.head_dim, dtype=x.dtype)
    cache_v = torch.zeros_like(cache_k)
    got = layer.cached(x, 0, cos, sin, mask, cache_k, cache_v, mod)
    composed = layer.finish(x, model.ops.attention(*layer.qkv(x, cos, sin, mod=mod), mask), mod=mod)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else {}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(composed, want, **tol)
    q, k, v = layer.reference_qkv(x, cos, sin, mod)  # what the cache holds
    torch.testing.assert_close(cache_k.view(k.shape), k, **tol)
    torch.testing.assert_close(cache_v.view(v.shape), v, **tol)
    assert not torch.equal(want, x)  # the layer did something


def gemma_layer_float64(layer, x, cos, sin, mask):
    """Gemma's decoder layer written out in float64 (RMSNorm scales by 1 + w; MQA; GeGLU)."""
    d = layer.dims
    w = {name: p.detach().double() for name, p in layer.named_parameters()}

    def rms(h, weight):
        return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6) * (1 + weight)

    def rope(h):  # rotate halves: x1*cos - x2*sin | x2*cos + x1*sin (sin is signed)
        half = h.shape[-1] // 2
        return h * cos.double() + torch.cat([h[..., half:], h[..., :half]], -1) * sin.double()

    x = x.double()
    q, k, v = (rms(x, w["input_norm.weight"]) @ w["qkv_proj.weight"].t()).split(
        [d.heads * d.head_dim, d.head_dim, d.head_dim], dim=-1
    )
    q = rope(q.unflatten(-1, (d.heads, d.head_dim))).transpose(1, 2)  # [B, H, T, Dh]
    k, v = rope(k[:, :, None])[:, :, 0], v  # one K/V head
    logits = q @ k[:, None].transpose(-1, -2) * d.head_dim**-0.5 + mask.double()[:, None]
    attn = (logits.softmax(-1) @ v[:, None]).transpose(1, 2).flatten(2)
    x = x + attn @ w["o_proj.weight"].t()
    gate, up = (rms(x, w["ffw_norm.weight"]) @ w["gate_up_proj.weight"].t()).chunk(2, dim=-1)
    gelu = torch.nn.functional.gelu(gate, approximate="tanh")
    return x + (gelu * up) @ w["down_proj.weight"].t()


def test_forward_reference_is_gemmas_layer():
    model = PI0Policy.random("tiny", device="cpu", dtype="float32").model
    for layer in (model.llm.layers[0], model.expert.layers[1]):
        x, cos, sin, mask, _ = layer_inputs(model, layer)
        want = gemma_layer_float64(layer, x, cos, sin, mask)
        got = layer.forward_reference(x, cos, sin, mask)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
