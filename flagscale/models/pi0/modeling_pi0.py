"""Pi0 and Pi0.5: SigLIP + Gemma (prefix tower) + Gemma action expert (suffix tower); inference.

Axes: B batch, N cameras, P prefix tokens (N*256 image + 48 language), S suffix tokens
(1 state + chunk actions), L layers, H query heads, Dh head dim (one K/V head: MQA), W width.

Sampling (openpi convention: t=1 is noise, t=0 is data):
  1. prefix pass: images -> SigLIP -> projector, language -> embed * sqrt(W); run the prefix tower
     once, keeping post-RoPE K/V of every layer in a cache [L, B, P + S, Dh].
  2. Euler loop: for t = 1, 1 + dt, ... the chunk's action tokens attend to prefix + state + chunk;
     v = action_out_proj(expert(...)); x += dt * v. The prefix region of the cache is never written.
     The state token depends only on the prefix and the state: it runs with the chunk in the first
     step only (cache slot P, its own mask row); later steps reuse its cached K/V.
  3. real-time chunking (`rtc.py`, only when a request asks for it): each step's velocity is
     guided towards the previous chunk's leftover; its "vjp" mode runs `velocity_autograd`, a
     differentiable expert pass over the frozen cache.

Pi0.5 (config.variant "pi0.5") differs in the expert only: no state token (the state is text in
the prompt); action tokens = action_in_proj(x_t); the time conditions every expert norm (adaRMS:
rms(x) * (1 + scale) + shift, with gated residuals), cond = SiLU(time_mlp_out(SiLU(time_mlp_in(
sincos(t))))). The modulation depends only on t, so all steps' are computed before the loop.

Attention masks follow big_vision's cumsum scheme (`make_attn_mask`); with the state cached, every
mask after the first step is a key-padding mask. Masked logits get -2.3819763e38, as in openpi.
Numerics: bf16 (or fp32) weights, fp32 norms / RoPE / softmax / time embedding / x_t / v_t.
"""

import math

from functools import lru_cache, partial
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from flagscale.logger import get_logger
from flagscale.models.names import check_num_steps
from flagscale.models.pi0.config import PI0Config, TowerDims, VisionDims
from flagscale.models.pi0.rtc import Guidance
from flagscale.ops import Ops, native, native_ops
from flagscale.ops.native import MASK_VALUE, rope_cos_sin

logger = get_logger(__name__)


class SuffixTables(NamedTuple):
    """`PI0Model.suffix_inputs`: RoPE tables [B, T, 1, Dh] and additive masks [B, T | 1, keys] of
    the first step (T = 1 + C: state + chunk) and of the later steps (T = C); Pi0.5 (no state
    token): the first step's are the later steps'."""

    first_cos: torch.Tensor
    first_sin: torch.Tensor
    first_mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor


def make_attn_mask(pad_mask: torch.Tensor, ar_mask: torch.Tensor) -> torch.Tensor:
    """big_vision: tokens attend to valid tokens whose cumulative ar index is <= their own.

    pad_mask, ar_mask: [B, T] bool/int -> [B, T, T] bool (True = may attend).
    """
    cum = torch.cumsum(ar_mask.to(torch.int32), dim=1)
    allowed = cum[:, None, :] <= cum[:, :, None]
    valid = pad_mask[:, None, :] & pad_mask[:, :, None]
    return allowed & valid


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> additive float mask (0 keep, -2.3819763e38 drop); no host copy (graph-safe)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, MASK_VALUE)


def posemb_sincos(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Time embedding [B] -> [B, dim] = [sin, cos], computed in float64."""
    device = t.device
    compute = torch.float32 if device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=compute, device=device)
    period = min_period * (max_period / min_period) ** fraction
    arg = t.to(compute)[:, None] * (2.0 * math.pi / period)[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).to(torch.float32)


class Linear(nn.Module):
    def __init__(self, ops: Ops, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None

    def forward(self, x):
        return self.ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: scales by (1 + weight); weight kept in fp32."""

    def __init__(self, ops: Ops, width: int, eps: float):
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)


class AdaRMSNorm(nn.Module):
    """Pi0.5's adaptive RMSNorm: `dense` maps the time condition to [scale | shift | gate]
    (openpi's order); out = rms(x) * (1 + scale) + shift, and `gate` scales the residual branch
    the norm feeds (the final norm uses scale and shift only)."""

    def __init__(self, ops: Ops, width: int, eps: float):
        super().__init__()
        self.ops, self.eps = ops, eps
        self.dense = Linear(ops, width, 3 * width)

    def forward(self, x, mod):
        """x [B, T, W], mod [B, 3W] fp32 (this norm's `dense(cond)`)."""
        scale, shift, _ = mod[:, None].chunk(3, dim=-1)
        return self.ops.ada_rms_norm(x, scale, shift, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, ops: Ops, width: int, eps: float):
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


# --------------------------------------------------------------------------------------------
# SigLIP
# --------------------------------------------------------------------------------------------


class SiglipLayer(nn.Module):
    def __init__(self, ops: Ops, dims: VisionDims, eps: float):
        super().__init__()
        self.ops, self.heads = ops, dims.heads
        self.ln1 = LayerNorm(ops, dims.width, eps)
        self.qkv = Linear(ops, dims.width, 3 * dims.width)  # fused q|k|v
        self.out = Linear(ops, dims.width, dims.width)
        self.ln2 = LayerNorm(ops, dims.width, eps)
        self.fc1 = Linear(ops, dims.width, dims.mlp)
        self.fc2 = Linear(ops, dims.mlp, dims.width)

    def forward(self, x, branch):
        """x [B, T, W] and the previous layer's MLP output (None for the first layer), whose
        residual add runs with this layer's first LayerNorm -> (x, this layer's MLP output)."""
        b, t, w = x.shape
        if branch is None:
            h = self.ln1(x)
        else:
            x, h = self.ops.add_layer_norm(x, branch, self.ln1.weight, self.ln1.bias, self.ln1.eps)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        x, h = self.ops.add_layer_norm(
            x, self.out(self.ops.attention(q, k, v)), self.ln2.weight, self.ln2.bias, self.ln2.eps
        )
        return x, self.fc2(self.ops.linear_gelu(h, self.fc1.weight, self.fc1.bias))


class Siglip(nn.Module):
    def __init__(self, ops: Ops, dims: VisionDims, eps: float, out_width: int):
        super().__init__()
        self.ops, self.dims = ops, dims
        self.patch_embed = nn.Parameter(torch.empty(dims.width, 3, dims.patch, dims.patch))
        self.patch_bias = nn.Parameter(torch.empty(dims.width))
        self.pos_embed = nn.Parameter(torch.empty(dims.tokens, dims.width))
        self.layers = nn.ModuleList(SiglipLayer(ops, dims, eps) for _ in range(dims.depth))
        self.post_ln = LayerNorm(ops, dims.width, eps)
        self.projector = Linear(ops, dims.width, out_width)

    def forward(self, images):  # images [B, 3, S, S] in [-1, 1] -> [B, T, out_width]
        b, p, g = images.shape[0], self.dims.patch, self.dims.image_size // self.dims.patch
        # Conv(stride = kernel = patch) as a matmul over (c, kh, kw)-ordered patches, fp32 (openpi)
        patches = images.float().reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        weight = self.patch_embed.float().reshape(self.dims.width, -1)
        x = self.ops.linear(patches.reshape(b, g * g, -1), weight, self.patch_bias.float())
        x = (x + self.pos_embed.float()).to(self.projector.weight.dtype)
        branch = None
        for layer in self.layers:
            x, branch = layer(x, branch)
        ln = self.post_ln
        if branch is None:  # no layers
            return self.projector(ln(x))
        return self.projector(self.ops.add_layer_norm(x, branch, ln.weight, ln.bias, ln.eps)[1])


# --------------------------------------------------------------------------------------------
# Gemma towers
# --------------------------------------------------------------------------------------------


class GemmaLayer(nn.Module):
    """One Gemma decoder layer split at the joint attention: `qkv()` before it, `finish()` after."""

    def __init__(self, ops: Ops, dims: TowerDims, eps: float, adaptive: bool = False):
        super().__init__()
        self.ops, self.dims, self.adaptive = ops, dims, adaptive
        # the whole layer in one launch (fused kernels, fixed norms only); chosen once, here
        self.one_launch = None if adaptive else ops.decoder_layer
        qkv_out = (dims.heads + 2 * dims.kv_heads) * dims.head_dim
        norm = AdaRMSNorm if adaptive else RMSNorm
        self.input_norm = norm(ops, dims.width, eps)
        self.qkv_proj = Linear(ops, dims.width, qkv_out, bias=False)  # fused q|k|v
        self.o_proj = Linear(ops, dims.heads * dims.head_dim, dims.width, bias=False)
        self.ffw_norm = norm(ops, dims.width, eps)
        self.gate_up_proj = Linear(ops, dims.width, 2 * dims.mlp, bias=False)  # fused gate|up
        self.down_proj = Linear(ops, dims.mlp, dims.width, bias=False)

    def qkv(self, x, cos, sin, k_out=None, v_out=None, mod=None):
        """x [B, T, W] -> q [B, T, H, Dh], k/v [B, T, Hkv, Dh] with RoPE on q and k; k and v are
        written into k_out / v_out [B, T, Hkv*Dh] (KV-cache slices) when given. `mod`: the
        adaptive layer's modulation [B, 2, 3W] (see `PI0Model.modulation`)."""
        b, t, _ = x.shape
        d = self.dims
        if k_out is None:
            k_out = x.new_empty(b, t, d.kv_heads * d.head_dim)
            v_out = x.new_empty(b, t, d.kv_heads * d.head_dim)
        norm = self.input_norm
        if self.adaptive:
            scale, shift, _ = mod[:, None, 0].chunk(3, dim=-1)
            q = self.ops.ada_qkv_rope(
                x, scale, shift, norm.eps, self.qkv_proj.weight, cos, sin,
                d.heads, d.kv_heads, d.head_dim, k_out, v_out,
            )  # fmt: skip
        else:
            q = self.ops.qkv_rope(
                x, norm.weight, norm.eps, self.qkv_proj.weight, cos, sin,
                d.heads, d.kv_heads, d.head_dim, k_out, v_out,
            )  # fmt: skip
        kv_shape = (b, t, d.kv_heads, d.head_dim)
        return q, k_out.view(kv_shape), v_out.view(kv_shape)

    def cached(self, x, start, cos, sin, mask, cache_k, cache_v, mod=None):
        """The layer over tokens at cache slots [start, start + T) that attend to
        cache[:, :start + T] (the expert's pass; cache_k / cache_v [B, S, Hkv*Dh]). One launch
        where the table's `decoder_layer` covers the shape, else qkv -> attention -> finish.
        `mod`: the adaptive layer's modulation (Pi0.5: never the one launch)."""
        d = self.dims
        if self.one_launch is not None:
            weights = (
                self.input_norm.weight, self.qkv_proj.weight, self.o_proj.weight,
                self.ffw_norm.weight, self.gate_up_proj.weight, self.down_proj.weight,
            )  # fmt: skip
            args = (x, weights, self.input_norm.eps, cos, sin, cache_k, cache_v, start, mask)
            out = self.one_launch(*args, d.heads, d.head_dim)
            if out is not None:
                return out
        end = start + x.shape[1]
        q, _, _ = self.qkv(x, cos, sin, cache_k[:, start:end], cache_v[:, start:end], mod)
        attn = self.ops.attention(q, cache_k[:, :end, None], cache_v[:, :end, None], mask)
        return self.finish(x, attn, mod=mod)

    def finish(self, x, attn, own_x=False, mod=None):
        """o_proj + residual, then the MLP + residual. The second sum accumulates in place
        into the first's tensor; with `own_x` (x is not read again) the first into x as well."""
        if self.adaptive:
            return self._finish_gated(x, attn, own_x, mod)
        x = self.ops.linear_residual(attn, self.o_proj.weight, x, inplace=own_x)
        act = self.ops.norm_geglu(
            x, self.ffw_norm.weight, self.ffw_norm.eps, self.gate_up_proj.weight
        )
        return self.ops.linear_residual(act, self.down_proj.weight, x, inplace=True)

    def _finish_gated(self, x, attn, own_x, mod):
        """Pi0.5: x + o_proj(attn) * gate1, then x + mlp(adaRMS(x)) * gate2 (gates in x.dtype)."""
        _, _, gate1 = mod[:, None, 0].chunk(3, dim=-1)
        scale2, shift2, gate2 = mod[:, None, 1].chunk(3, dim=-1)
        ops = self.ops
        x = ops.linear_gated_residual(attn, self.o_proj.weight, x, gate1.to(x.dtype), own_x)
        act = ops.ada_norm_geglu(x, scale2, shift2, self.ffw_norm.eps, self.gate_up_proj.weight)
        return ops.linear_gated_residual(act, self.down_proj.weight, x, gate2.to(x.dtype), True)

    # ---- the same layer in plain primitives (the uncached reference path) --------------------

    def forward_reference(self, x, cos, sin, mask, mod=None):
        """The layer as the papers write it, over its own tokens: x [B, T, W] -> [B, T, W]
        (RoPE tables [B, T, 1, Dh], additive mask [B, T | 1, T]). Pi0.5 (`mod` [B, 2, 3W]): both
        norms are adaRMS and both residual branches are gated. The uncached path runs the two
        halves with one attention over both towers' tokens."""
        q, k, v = self.reference_qkv(x, cos, sin, mod)
        return self.reference_finish(x, self.ops.attention(q, k, v, mask), mod)

    def reference_qkv(self, x, cos, sin, mod=None, ops=None):
        """norm -> q|k|v projection -> RoPE on q and k: q [B, T, H, Dh], k / v [B, T, Hkv, Dh].
        `ops`: another table than the layer's (the autograd path's native ops)."""
        (b, t, _), d, ops = x.shape, self.dims, ops or self.ops
        qkv = ops.linear(_norm(ops, self.input_norm, x, mod, 0), self.qkv_proj.weight)
        n_qk = d.heads + d.kv_heads
        qk = qkv[..., : n_qk * d.head_dim].view(b, t, n_qk, d.head_dim)
        q, k = ops.rope(qk, cos, sin, d.heads)
        return q, k, qkv[..., n_qk * d.head_dim :].reshape(b, t, d.kv_heads, d.head_dim)

    def reference_finish(self, x, attn, mod=None, ops=None):
        """x + o_proj(attn), then x + down_proj(GeGLU(gate_up_proj(norm(x))))."""
        ops = ops or self.ops
        x = x + self._gated(ops.linear(attn, self.o_proj.weight), mod, 0)
        h = ops.geglu(ops.linear(_norm(ops, self.ffw_norm, x, mod, 1), self.gate_up_proj.weight))
        return x + self._gated(ops.linear(h, self.down_proj.weight), mod, 1)

    @staticmethod
    def _gated(branch, mod, row):
        """Pi0.5 scales a residual branch by the gate of row `row` of `mod` (in x's dtype)."""
        if mod is None:
            return branch
        return branch * mod[:, None, row].chunk(3, dim=-1)[2].to(branch.dtype)


class GemmaTower(nn.Module):
    def __init__(
        self, ops: Ops, dims: TowerDims, eps: float, vocab_size: int = 0, adaptive: bool = False
    ):
        super().__init__()
        self.dims = dims
        self.embed = nn.Parameter(torch.empty(vocab_size, dims.width)) if vocab_size else None
        layers = (GemmaLayer(ops, dims, eps, adaptive) for _ in range(dims.depth))
        self.layers = nn.ModuleList(layers)
        self.norm = (AdaRMSNorm if adaptive else RMSNorm)(ops, dims.width, eps)

    def final_norm(self, x, mod=None):
        """The tower's last norm; `mod` [B, 2L + 1, 3W]: the adaptive final norm uses the last."""
        return self.norm(x) if mod is None else self.norm(x, mod[:, -1])


# --------------------------------------------------------------------------------------------
# Pi0
# --------------------------------------------------------------------------------------------


def _pi05_expert_path(ops: Ops) -> str:
    """Which kernels Pi0.5's action expert runs with a fused table (one log line)."""
    if "ada_qkv_rope" in ops.fused:
        return (
            "Pi0.5: the action expert's adaptive norms and gated residuals run the fused adaptive "
            "kernels (fused_kernels: true; tested in Triton's interpreter, not yet measured on a "
            "GPU); attention and the prefix tower run the fused kernels"
        )
    return (
        "Pi0.5: the action expert's adaptive norms and gated residuals run composed ops (their "
        "fused kernels are opt-in: fused_kernels: true); its attention and the prefix tower keep "
        "the fused kernels"
    )


class PI0Model(nn.Module):
    def __init__(self, config: PI0Config, ops: Optional[Ops] = None):
        super().__init__()
        ops = ops or native_ops()
        self.config, self.ops = config, ops
        c = config
        self.vision = Siglip(ops, c.vision, c.layer_norm_eps, c.llm.width)
        self.llm = GemmaTower(ops, c.llm, c.rms_norm_eps, c.vocab_size)
        self.expert = GemmaTower(ops, c.expert, c.rms_norm_eps, adaptive=c.pi05)
        w = c.expert.width
        self.action_in_proj = Linear(ops, c.max_action_dim, w)
        if c.pi05:  # the time conditions the expert's norms; no state token
            self.time_mlp_in = Linear(ops, w, w)
            self.time_mlp_out = Linear(ops, w, w)
        else:
            self.state_proj = Linear(ops, c.max_state_dim, w)
            self.action_time_mlp_in = Linear(ops, 2 * w, w)
            self.action_time_mlp_out = Linear(ops, w, w)
        self.action_out_proj = Linear(ops, w, c.max_action_dim)
        self._passes = {}  # torch.compile'd versions of the passes, see compile_passes()
        if c.pi05 and ops.fused:
            logger.info(_pi05_expert_path(ops))

    @property
    def state_tokens(self) -> int:
        """Suffix tokens before the chunk: Pi0's state token, none for Pi0.5."""
        return 0 if self.config.pi05 else 1

    def compile_passes(self, parts=None, mode=None):
        """torch.compile the given passes (default all three): fuses the norms, RoPE, GeGLU and
        residual adds that otherwise cost hundreds of tiny kernels per denoising step."""
        parts = parts or ("first", "denoise", "prefix")
        fns = {
            "prefix": self.fill_prefix_cache,
            "first": self.first_step,
            "denoise": self.denoise_step,
        }
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        for part in parts:  # static shapes: one compile per (batch bucket, cameras)
            self._passes[part] = torch.compile(fns[part], dynamic=False, mode=mode)

    def _pass(self, name, default):
        return self._passes.get(name, default)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.layers[0].qkv_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.layers[0].qkv_proj.weight.device

    # ---- prefix ------------------------------------------------------------------------

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks):
        """images [B, N, 3, S, S], img_masks [B, N], lang [B, Lt] -> embs [B, P, W], pad [B, P]."""
        b, n = images.shape[:2]
        img = self.vision(images.flatten(0, 1))  # [B*N, T, W]
        img = img.view(b, n * img.shape[1], img.shape[2])
        tokens_per_image = img.shape[1] // n
        img_pad = img_masks.bool().repeat_interleave(tokens_per_image, dim=1)
        # PyTorch ports multiply by sqrt(W) as a Python float (openpi JAX rounds it to bf16 first).
        lang = self.llm.embed[lang_tokens] * math.sqrt(self.config.llm.width)
        embs = torch.cat([img, lang.to(img.dtype)], dim=1)
        return embs, torch.cat([img_pad, lang_masks.bool()], dim=1)

    def fill_prefix_cache(self, embs, pad, cache_k, cache_v):
        """Run the prefix tower; write post-RoPE K/V into cache[:, :, :P]."""
        positions = torch.cumsum(pad.to(torch.int32), dim=1) - 1
        cos, sin = rope_cos_sin(positions, self.config.llm.head_dim, self.config.rope_theta)
        mask = additive_mask(pad[:, None, :], embs.dtype)  # prefix: bidirectional over valid keys
        p, x = embs.shape[1], embs
        last = len(self.llm.layers) - 1
        for i, layer in enumerate(self.llm.layers):
            q, k, v = layer.qkv(x, cos, sin, cache_k[i, :, :p], cache_v[i, :, :p])
            if i < last:  # the last layer's output is never used: only its K/V are needed
                # from layer 1 on, x is the previous layer's own output: sums in place
                x = layer.finish(x, self.ops.attention(q, k, v, mask), own_x=i > 0)

    # ---- suffix ------------------------------------------------------------------------

    def _expert_pass(self, x, start, cos, sin, mask, cache_k, cache_v, mod=None):
        """Expert tokens at cache slots [start, start+T) attend to cache[:, :, :start+T].
        `mod` [B, 2L + 1, 3W]: Pi0.5's per-step norm modulation (None for Pi0)."""
        for i, layer in enumerate(self.expert.layers):
            m = None if mod is None else mod[:, 2 * i : 2 * i + 2]
            x = layer.cached(x, start, cos, sin, mask, cache_k[i], cache_v[i], m)
        return self.expert.final_norm(x, mod)

    def time_embedding(self, t):
        """t [B] -> [B, W] sin-cos embedding of the flow time, in the weights' dtype."""
        c = self.config
        return posemb_sincos(t, c.expert.width, c.min_period, c.max_period).to(self.dtype)

    def modulation(self, t):
        """Pi0.5: t [B] -> every expert norm's [scale | shift | gate], [B, 2L + 1, 3W] fp32
        (layer i: rows 2i (input norm) and 2i + 1 (pre-MLP norm); the last row: the final
        norm). cond = SiLU(time_mlp_out(SiLU(time_mlp_in(sincos(t))))), all in fp32."""
        c = self.config
        emb = posemb_sincos(t, c.expert.width, c.min_period, c.max_period)
        emb = emb.to(self.time_mlp_in.weight.dtype)  # fp32 as loaded (weights.keeps_fp32)
        cond = self.ops.silu(self.time_mlp_out(self.ops.silu(self.time_mlp_in(emb))))
        norms = [n for layer in self.expert.layers for n in (layer.input_norm, layer.ffw_norm)]
        norms.append(self.expert.norm)
        return torch.stack([n.dense(cond.to(n.dense.weight.dtype)).float() for n in norms], dim=1)

    def step_conditions(self, times):
        """times [S, B] -> the per-step input of `first_step` / `denoise_step`, [S, B, ...]:
        Pi0's time embeddings, Pi0.5's norm modulations. Depends only on the schedule, so it
        is computed once per request before the loop (no host syncs)."""
        fn = self.modulation if self.config.pi05 else self.time_embedding
        out = fn(times.flatten())
        return out.view(times.shape + out.shape[1:])

    def embed_actions(self, x_t, time_emb):
        """x_t [B, C, A] fp32, time_emb [B, W] -> action tokens [B, C, W]:
        MLP(concat(action, time)) for Pi0, action_in_proj(x_t) alone for Pi0.5."""
        act = self.action_in_proj(x_t.to(self.dtype))
        if self.config.pi05:
            return act
        b, chunk = x_t.shape[:2]
        h = torch.cat([act, time_emb[:, None].expand(b, chunk, -1)], dim=-1)  # action first
        return self.action_time_mlp_out(self.ops.silu(self.action_time_mlp_in(h)))

    def suffix_inputs(self, pad, chunk) -> SuffixTables:
        """RoPE tables and additive masks of the expert's tokens, the same at every denoising
        step, so computed once per request. Pi0's first step runs the state token with the chunk
        (1 + C tokens; the state token sees the prefix and itself, the chunk sees everything);
        later steps run the chunk alone over the state token's cached K/V. Pi0.5 has no state
        token: every step is a later step."""
        b, p = pad.shape
        n = self.state_tokens
        n_valid = pad.sum(dim=1, keepdim=True)
        positions = n_valid + torch.arange(chunk + n, device=pad.device)[None]
        cos, sin = rope_cos_sin(positions, self.config.expert.head_dim, self.config.rope_theta)
        keys = torch.cat([pad, torch.ones_like(pad[:, :1]).expand(b, chunk + n)], dim=1)
        mask = additive_mask(keys[:, None, :], self.dtype)
        if not n:  # Pi0.5: the first step is a later step
            return SuffixTables(cos, sin, mask, cos, sin, mask)
        first = keys[:, None, :].repeat(1, chunk + n, 1)
        first[:, 0, p + 1 :] = False  # the state token does not attend to the actions
        return SuffixTables(
            first_cos=cos,
            first_sin=sin,
            first_mask=additive_mask(first, self.dtype),
            cos=cos[:, n:].contiguous(),
            sin=sin[:, n:].contiguous(),
            mask=mask,
        )

    def first_step(self, state, x_t, cond, s: SuffixTables, cache_k, cache_v):
        """Step 1. Pi0: the state token and the chunk in one expert pass (the state token's K/V
        land in the cache for the later steps: they never change). Pi0.5: a plain step (`state`
        is not used). -> velocity [B, C, A] fp32."""
        if self.config.pi05:
            return self.denoise_step(x_t, cond, s.cos, s.sin, s.mask, cache_k, cache_v)
        state_token = self.state_proj(state.to(self.dtype))[:, None]
        h = torch.cat([state_token, self.embed_actions(x_t, cond)], dim=1)
        start = s.first_mask.shape[-1] - h.shape[1]  # prefix slots
        out = self._expert_pass(h, start, s.first_cos, s.first_sin, s.first_mask, cache_k, cache_v)
        return self.action_out_proj(out[:, 1:]).float()

    def denoise_step(self, x_t, cond, cos, sin, mask, cache_k, cache_v):
        """Steps 2..n (Pi0.5: every step): x_t [B, C, A] fp32, cond = this step's row of
        `step_conditions`, the suffix tables' cos / sin / mask -> velocity [B, C, A] fp32."""
        h = self.embed_actions(x_t, cond)
        start = mask.shape[-1] - x_t.shape[1]  # prefix (+ state) slots
        mod = cond if self.config.pi05 else None
        out = self._expert_pass(h, start, cos, sin, mask, cache_k, cache_v, mod)
        return self.action_out_proj(out).float()

    # ---- sampling ----------------------------------------------------------------------

    def new_cache(self, batch: int, prefix_len: int):
        c = self.config
        shape = (c.llm.depth, batch, prefix_len + self.state_tokens + c.chunk_size, c.llm.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        return torch.zeros(shape, **kw), torch.zeros(shape, **kw)

    @torch.no_grad()
    def sample_actions(
        self,
        images: Union[torch.Tensor, Sequence[torch.Tensor]],
        img_masks: Union[torch.Tensor, Sequence[torch.Tensor]],
        lang_tokens: torch.Tensor,
        lang_masks: torch.Tensor,
        state: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        num_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        rtc: Optional[Guidance] = None,
    ) -> torch.Tensor:
        """lerobot conventions: images [B, N, 3, S, S] (or a list of N [B, 3, S, S]) in [-1, 1],
        img_masks [B, N] bool (or a list of [B]), lang [B, Lt], state [B, max_state_dim]
        (Pi0; Pi0.5 has its state in the prompt and ignores this argument), noise
        [B, chunk_size, max_action_dim] fp32 (never written to), `rtc`: real-time chunking
        guidance of every step (`rtc.Guidance`). Returns actions [B, chunk_size, max_action_dim]
        fp32 (normalized space)."""
        images, img_masks = _stack_cameras(images, img_masks)
        c = self.config
        if state is None and not c.pi05:
            raise ValueError("Pi0 needs the state: sample_actions(..., state=[B, max_state_dim])")
        num_steps = check_num_steps(c.num_steps if num_steps is None else num_steps)
        b = images.shape[0]
        images = images.to(device=self.device)
        if noise is None:
            shape = (b, c.chunk_size, c.max_action_dim)
            noise = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
        embs, pad = self.embed_prefix(
            images,
            img_masks.to(self.device),
            lang_tokens.to(self.device),
            lang_masks.to(self.device),
        )
        cache_k, cache_v = self.new_cache(b, embs.shape[1])
        self._pass("prefix", self.fill_prefix_cache)(embs, pad, cache_k, cache_v)
        noise = noise.to(self.device, torch.float32)
        state = None if c.pi05 else state.to(self.device)
        rtc = None if rtc is None else rtc.to(self.device)
        return self.euler(noise, num_steps, pad, state, cache_k, cache_v, rtc)

    def euler(self, noise, num_steps, pad, state, cache_k, cache_v, rtc=None):
        """Euler from t = 1 (noise) to 0 with dt = -1 / num_steps; each step's velocity comes
        from `velocity_fn` (the one place a guidance method wraps, for both variants); `rtc`
        guides it (`rtc.Guidance.step`)."""
        dt = -1.0 / num_steps
        b = noise.shape[0]
        times = torch.empty(num_steps, b, dtype=torch.float32, device=noise.device)
        for i in range(num_steps):  # Python-int schedule: no host sync, same values as openpi
            times[i].fill_(1.0 + i * dt)
        conds = self.step_conditions(times)
        s = self.suffix_inputs(pad, noise.shape[1])
        velocity = self.velocity_fn(state, s, cache_k, cache_v)
        x_t = noise
        for i in range(num_steps):
            v_t = velocity(i, x_t, conds[i])
            if rtc is not None:  # Pi0: step 0 wrote the state token's K/V, frozen from here on
                v_t = self._guided(rtc, x_t, v_t, 1.0 + i * dt, conds[i], s, cache_k, cache_v)
            x_t = x_t + dt * v_t
        return x_t

    def velocity_fn(self, state, s: SuffixTables, cache_k, cache_v):
        """-> velocity(i, x_t, cond): the model's velocity at step i for x_t [B, C, A] fp32 and
        that step's row of `step_conditions` (the prefix cache and suffix tables bound)."""
        first = self._pass("first", self.first_step)
        step = self._pass("denoise", self.denoise_step)

        def velocity(i, x_t, cond):
            if i == 0:
                return first(state, x_t, cond, s, cache_k, cache_v)
            return step(x_t, cond, s.cos, s.sin, s.mask, cache_k, cache_v)

        return velocity

    # ---- real-time chunking ------------------------------------------------------------

    def _guided(self, rtc, x_t, v_t, time, cond, s, cache_k, cache_v):
        velocity = partial(self.velocity_autograd, cond=cond, s=s, cache_k=cache_k, cache_v=cache_v)
        return rtc.step(x_t, v_t, time, velocity)

    def velocity_autograd(self, x_t, cond, s: SuffixTables, cache_k, cache_v):
        """The chunk's velocity at x_t over the cached prefix (+ Pi0 state) K/V, differentiable
        in x_t: native torch ops whatever the op table (fused kernels and FlagGems have no
        backward), nothing written into the cache, no in-place sums. Same math as
        `denoise_step`; `cond`: this step's row of `step_conditions`."""
        lin = lambda mod, x: native.linear(x, mod.weight, mod.bias)  # noqa: E731
        b, chunk = x_t.shape[:2]
        x = lin(self.action_in_proj, x_t.to(self.dtype))
        mod = cond if self.config.pi05 else None
        if mod is None:
            h = torch.cat([x, cond[:, None].expand(b, chunk, -1)], dim=-1)
            x = lin(self.action_time_mlp_out, native.silu(lin(self.action_time_mlp_in, h)))
        past = s.mask.shape[-1] - chunk  # prefix (+ state) slots
        for i, layer in enumerate(self.expert.layers):
            m = None if mod is None else mod[:, 2 * i : 2 * i + 2]
            kv = (cache_k[i, :, :past], cache_v[i, :, :past])
            x = _layer_autograd(layer, x, s.cos, s.sin, s.mask, *kv, m)
        final = _norm(_autograd_ops(), self.expert.norm, x, mod, -1)
        return lin(self.action_out_proj, final).float()

    # ---- uncached reference (tests) -----------------------------------------------------

    @torch.no_grad()
    def sample_actions_uncached(
        self, images, img_masks, lang_tokens, lang_masks, state, noise, num_steps
    ):  # state: None for Pi0.5
        """openpi's algorithm without any cache: every step runs both towers over the full
        sequence with the joint per-layer attention and the full `make_attn_mask` mask."""
        images, img_masks = _stack_cameras(images, img_masks)
        embs, pad = self.embed_prefix(images, img_masks, lang_tokens, lang_masks)
        dt, x_t = -1.0 / num_steps, noise.clone().float()
        for i in range(num_steps):
            t = torch.full((x_t.shape[0],), 1.0 + i * dt, dtype=torch.float32)
            x_t = x_t + dt * self._joint_velocity(embs, pad, state, x_t, t)
        return x_t

    def _joint_velocity(self, prefix, prefix_pad, state, x_t, t):
        b, chunk = x_t.shape[:2]
        n = self.state_tokens
        mod = self.modulation(t) if self.config.pi05 else None
        suffix = self.embed_actions(x_t, None if mod is not None else self.time_embedding(t))
        if n:
            suffix = torch.cat([self.state_proj(state.to(self.dtype))[:, None], suffix], dim=1)
        suffix_ar = torch.zeros(b, chunk + n, dtype=torch.bool)
        suffix_ar[:, : n + 1] = True
        pad = torch.cat([prefix_pad, torch.ones(b, chunk + n, dtype=torch.bool)], dim=1)
        ar = torch.cat([torch.zeros_like(prefix_pad), suffix_ar], dim=1)
        mask = additive_mask(make_attn_mask(pad, ar), prefix.dtype)
        positions = torch.cumsum(pad.to(torch.int32), dim=1) - 1
        out = self._joint_layers([prefix, suffix], mask, positions, mod)
        return self.action_out_proj(out[:, -chunk:]).float()

    def _joint_layers(self, streams, mask, positions, mod=None):
        """Both towers, one joint attention per layer (streams concatenated along T), each
        layer in plain primitives (`GemmaLayer.forward_reference`'s halves); `mod`: the
        expert's norm modulation (Pi0.5)."""
        towers = (self.llm, self.expert)
        cos, sin = rope_cos_sin(positions, self.config.llm.head_dim, self.config.rope_theta)
        lengths = [s.shape[1] for s in streams]
        starts = [0, lengths[0]]
        for i in range(self.config.llm.depth):
            layers = [tower.layers[i] for tower in towers]
            mods = (None, None if mod is None else mod[:, 2 * i : 2 * i + 2])
            parts = [
                layer.reference_qkv(x, cos[:, s : s + n], sin[:, s : s + n], m)
                for layer, x, s, n, m in zip(layers, streams, starts, lengths, mods)
            ]
            q, k, v = (torch.cat([p[j] for p in parts], dim=1) for j in range(3))
            attn = self.ops.attention(q, k, v, mask).split(lengths, dim=1)
            streams = [
                layer.reference_finish(x, a, m)
                for layer, x, a, m in zip(layers, streams, attn, mods)
            ]
        return self.expert.final_norm(streams[1], mod)


def _norm(ops: Ops, norm, x, mod, row):
    """RMSNorm(1 + w); with `mod` [B, R, 3W] Pi0.5's rms(x) * (1 + scale) + shift from row
    `row` of `mod`."""
    if mod is None:
        return ops.rms_norm(x, norm.weight, norm.eps)
    scale, shift, _ = mod[:, None, row].chunk(3, dim=-1)
    return ops.ada_rms_norm(x, scale, shift, norm.eps)


@lru_cache(maxsize=1)
def _autograd_ops() -> Ops:
    """The native table: fused kernels and FlagGems have no backward."""
    return native_ops()


def _layer_autograd(layer: GemmaLayer, x, cos, sin, mask, past_k, past_v, mod=None):
    """`GemmaLayer.cached` for autograd: the reference layer in native ops, new tokens' K/V
    appended to the frozen past K/V [B, P, Hkv*Dh] rather than written into the cache. `mod`
    [B, 2, 3W]: Pi0.5's modulation of this layer's two norms (gated residuals)."""
    ops, d = _autograd_ops(), layer.dims
    q, k, v = layer.reference_qkv(x, cos, sin, mod, ops)
    kv_shape = (x.shape[0], -1, d.kv_heads, d.head_dim)
    keys = torch.cat([past_k.view(kv_shape), k], dim=1)
    values = torch.cat([past_v.view(kv_shape), v], dim=1)
    return layer.reference_finish(x, ops.attention(q, keys, values, mask), mod, ops)


def _stack_cameras(images, img_masks):
    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images), dim=1)
    if isinstance(img_masks, (list, tuple)):
        img_masks = torch.stack([torch.as_tensor(m) for m in img_masks], dim=1)
    return images, img_masks.bool()
