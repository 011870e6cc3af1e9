"""Pi0: SigLIP + Gemma (prefix tower) + Gemma action expert (suffix tower), inference only.

Axes: B batch, N cameras, P prefix tokens (N*256 image + 48 language), S suffix tokens
(1 state + chunk actions), L layers, H query heads, Dh head dim (one K/V head: MQA), W width.

Sampling (openpi convention: t=1 is noise, t=0 is data):
  1. prefix pass: images -> SigLIP -> projector, language -> embed * sqrt(W); run the prefix tower
     once, keeping post-RoPE K/V of every layer in a cache [L, B, P + S, Dh].
  2. Euler loop: for t = 1, 1 + dt, ... the chunk's action tokens attend to prefix + state + chunk;
     v = action_out_proj(expert(...)); x += dt * v. The prefix region of the cache is never written.
     The state token depends only on the prefix and the state: it runs with the chunk in the first
     step only (cache slot P, its own mask row); later steps reuse its cached K/V.

Attention masks follow big_vision's cumsum scheme (`make_attn_mask`); with the state cached, every
mask after the first step is a key-padding mask. Masked logits get -2.3819763e38, as in openpi.
Numerics: bf16 (or fp32) weights, fp32 norms / RoPE / softmax / time embedding / x_t / v_t.
"""

import math

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from flagscale.models.pi0.config import PI0Config, TowerDims, VisionDims
from flagscale.ops import Ops, native_ops
from flagscale.ops.native import MASK_VALUE, apply_rope, rope_cos_sin  # noqa: F401 (re-export)


class SuffixTables(NamedTuple):
    """`PI0Model.suffix_inputs`: RoPE tables [B, T, 1, Dh] and additive masks [B, T | 1, keys] of
    the first step (T = 1 + C: state + chunk) and of the later steps (T = C)."""

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
    """bool mask -> additive float mask (0 keep, -2.3819763e38 drop); no host copies (graph-safe)."""
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
        # Conv(stride = kernel = patch) as a matmul over (c, kh, kw)-ordered patches; fp32 like openpi.
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
    """One Gemma decoder layer, split at the joint attention: `qkv()` before it, `finish()` after."""

    def __init__(self, ops: Ops, dims: TowerDims, eps: float):
        super().__init__()
        self.ops, self.dims = ops, dims
        qkv_out = (dims.heads + 2 * dims.kv_heads) * dims.head_dim
        self.input_norm = RMSNorm(ops, dims.width, eps)
        self.qkv_proj = Linear(ops, dims.width, qkv_out, bias=False)  # fused q|k|v
        self.o_proj = Linear(ops, dims.heads * dims.head_dim, dims.width, bias=False)
        self.ffw_norm = RMSNorm(ops, dims.width, eps)
        self.gate_up_proj = Linear(ops, dims.width, 2 * dims.mlp, bias=False)  # fused gate|up
        self.down_proj = Linear(ops, dims.mlp, dims.width, bias=False)

    def qkv(self, x, cos, sin, k_out=None, v_out=None):
        """x [B, T, W] -> q [B, T, H, Dh], k/v [B, T, Hkv, Dh] with RoPE on q and k; k and v are
        written into k_out / v_out [B, T, Hkv*Dh] (KV-cache slices) when given."""
        b, t, _ = x.shape
        d = self.dims
        if k_out is None:
            k_out = x.new_empty(b, t, d.kv_heads * d.head_dim)
            v_out = x.new_empty(b, t, d.kv_heads * d.head_dim)
        norm = self.input_norm
        q = self.ops.qkv_rope(
            x, norm.weight, norm.eps, self.qkv_proj.weight, cos, sin,
            d.heads, d.kv_heads, d.head_dim, k_out, v_out,
        )  # fmt: skip
        kv_shape = (b, t, d.kv_heads, d.head_dim)
        return q, k_out.view(kv_shape), v_out.view(kv_shape)

    def cached(self, x, start, cos, sin, mask, cache_k, cache_v):
        """The layer over tokens at cache slots [start, start + T) that attend to
        cache[:, :start + T] (the expert's pass; cache_k / cache_v [B, S, Hkv*Dh]). One launch
        where the op table has a fused `decoder_layer` for the shape, else qkv -> attention ->
        finish."""
        d = self.dims
        fused = getattr(self.ops, "decoder_layer", None)
        if fused is not None:
            weights = (
                self.input_norm.weight, self.qkv_proj.weight, self.o_proj.weight,
                self.ffw_norm.weight, self.gate_up_proj.weight, self.down_proj.weight,
            )  # fmt: skip
            args = (x, weights, self.input_norm.eps, cos, sin, cache_k, cache_v, start, mask)
            out = fused(*args, d.heads, d.head_dim)
            if out is not None:
                return out
        end = start + x.shape[1]
        q, _, _ = self.qkv(x, cos, sin, cache_k[:, start:end], cache_v[:, start:end])
        attn = self.ops.attention(q, cache_k[:, :end, None], cache_v[:, :end, None], mask)
        return self.finish(x, attn)

    def finish(self, x, attn, own_x=False):
        """o_proj + residual, then the MLP + residual. The second sum accumulates in place
        into the first's tensor; with `own_x` (x is not read again) the first into x as well."""
        x = self.ops.linear_residual(attn, self.o_proj.weight, x, inplace=own_x)
        act = self.ops.norm_geglu(
            x, self.ffw_norm.weight, self.ffw_norm.eps, self.gate_up_proj.weight
        )
        return self.ops.linear_residual(act, self.down_proj.weight, x, inplace=True)


class GemmaTower(nn.Module):
    def __init__(self, ops: Ops, dims: TowerDims, eps: float, vocab_size: int = 0):
        super().__init__()
        self.dims = dims
        self.embed = nn.Parameter(torch.empty(vocab_size, dims.width)) if vocab_size else None
        self.layers = nn.ModuleList(GemmaLayer(ops, dims, eps) for _ in range(dims.depth))
        self.norm = RMSNorm(ops, dims.width, eps)


# --------------------------------------------------------------------------------------------
# Pi0
# --------------------------------------------------------------------------------------------


class PI0Model(nn.Module):
    def __init__(self, config: PI0Config, ops: Optional[Ops] = None):
        super().__init__()
        ops = ops or native_ops()
        self.config, self.ops = config, ops
        c = config
        self.vision = Siglip(ops, c.vision, c.layer_norm_eps, c.llm.width)
        self.llm = GemmaTower(ops, c.llm, c.rms_norm_eps, c.vocab_size)
        self.expert = GemmaTower(ops, c.expert, c.rms_norm_eps)
        w = c.expert.width
        self.state_proj = Linear(ops, c.max_state_dim, w)
        self.action_in_proj = Linear(ops, c.max_action_dim, w)
        self.action_time_mlp_in = Linear(ops, 2 * w, w)
        self.action_time_mlp_out = Linear(ops, w, w)
        self.action_out_proj = Linear(ops, w, c.max_action_dim)
        self._passes = {}  # torch.compile'd versions of the passes, see compile_passes()

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

    def _expert_pass(self, x, start, cos, sin, mask, cache_k, cache_v):
        """Expert tokens at cache slots [start, start+T) attend to cache[:, :, :start+T]."""
        for i, layer in enumerate(self.expert.layers):
            x = layer.cached(x, start, cos, sin, mask, cache_k[i], cache_v[i])
        return self.expert.norm(x)

    def time_embedding(self, t):
        """t [B] -> [B, W] sin-cos embedding of the flow time, in the weights' dtype."""
        c = self.config
        return posemb_sincos(t, c.expert.width, c.min_period, c.max_period).to(self.dtype)

    def embed_actions(self, x_t, time_emb):
        """x_t [B, C, A] fp32, time_emb [B, W] -> action tokens [B, C, W]:
        MLP(concat(action, time))."""
        b, chunk = x_t.shape[:2]
        act = self.action_in_proj(x_t.to(self.dtype))
        h = torch.cat([act, time_emb[:, None].expand(b, chunk, -1)], dim=-1)  # action first
        return self.action_time_mlp_out(self.ops.silu(self.action_time_mlp_in(h)))

    def suffix_inputs(self, pad, chunk) -> SuffixTables:
        """RoPE tables and additive masks of the expert's tokens, the same at every denoising
        step, so computed once per request. The first step runs the state token with the chunk
        (1 + C tokens; the state token sees the prefix and itself, the chunk sees everything);
        later steps run the chunk alone over the state token's cached K/V."""
        b, p = pad.shape
        n_valid = pad.sum(dim=1, keepdim=True)
        positions = n_valid + torch.arange(chunk + 1, device=pad.device)[None]
        cos, sin = rope_cos_sin(positions, self.config.expert.head_dim, self.config.rope_theta)
        keys = torch.cat([pad, torch.ones_like(pad[:, :1]).expand(b, chunk + 1)], dim=1)
        first = keys[:, None, :].repeat(1, chunk + 1, 1)
        first[:, 0, p + 1 :] = False  # the state token does not attend to the actions
        return SuffixTables(
            first_cos=cos,
            first_sin=sin,
            first_mask=additive_mask(first, self.dtype),
            cos=cos[:, 1:].contiguous(),
            sin=sin[:, 1:].contiguous(),
            mask=additive_mask(keys[:, None, :], self.dtype),
        )

    def first_step(self, state, x_t, time_emb, s: SuffixTables, cache_k, cache_v):
        """Step 1: the state token and the chunk in one expert pass (the state token's K/V land
        in the cache for the later steps: they never change). -> velocity [B, C, A] fp32."""
        state_token = self.state_proj(state.to(self.dtype))[:, None]
        h = torch.cat([state_token, self.embed_actions(x_t, time_emb)], dim=1)
        start = s.first_mask.shape[-1] - h.shape[1]  # prefix slots
        out = self._expert_pass(h, start, s.first_cos, s.first_sin, s.first_mask, cache_k, cache_v)
        return self.action_out_proj(out[:, 1:]).float()

    def denoise_step(self, x_t, time_emb, cos, sin, mask, cache_k, cache_v):
        """Steps 2..n: x_t [B, C, A] fp32, time_emb [B, W], the suffix tables' cos / sin / mask
        -> velocity [B, C, A] fp32."""
        h = self.embed_actions(x_t, time_emb)
        start = mask.shape[-1] - x_t.shape[1]  # prefix + state slots
        out = self._expert_pass(h, start, cos, sin, mask, cache_k, cache_v)
        return self.action_out_proj(out).float()

    # ---- sampling ----------------------------------------------------------------------

    def new_cache(self, batch: int, prefix_len: int):
        c = self.config
        shape = (c.llm.depth, batch, prefix_len + 1 + c.chunk_size, c.llm.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        return torch.zeros(shape, **kw), torch.zeros(shape, **kw)

    @torch.no_grad()
    def sample_actions(
        self,
        images: Union[torch.Tensor, Sequence[torch.Tensor]],
        img_masks: Union[torch.Tensor, Sequence[torch.Tensor]],
        lang_tokens: torch.Tensor,
        lang_masks: torch.Tensor,
        state: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        num_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """lerobot conventions: images [B, N, 3, S, S] (or a list of N [B, 3, S, S]) in [-1, 1],
        img_masks [B, N] bool (or a list of [B]), lang [B, Lt], state [B, max_state_dim],
        noise [B, chunk_size, max_action_dim] fp32 (never written to). Returns actions
        [B, chunk_size, max_action_dim] fp32 (normalized space)."""
        images, img_masks = _stack_cameras(images, img_masks)
        c = self.config
        num_steps = c.num_steps if num_steps is None else int(num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
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
        return self.euler(noise, num_steps, pad, state.to(self.device), cache_k, cache_v)

    def euler(self, noise, num_steps, pad, state, cache_k, cache_v):
        dt = -1.0 / num_steps
        b = noise.shape[0]
        times = torch.empty(num_steps, b, dtype=torch.float32, device=noise.device)
        for i in range(num_steps):  # Python-int schedule: no host sync, same values as openpi
            times[i].fill_(1.0 + i * dt)
        time_embs = self.time_embedding(times.flatten()).view(num_steps, b, -1)
        s = self.suffix_inputs(pad, noise.shape[1])
        step = self._pass("denoise", self.denoise_step)
        x_t = noise + dt * self._pass("first", self.first_step)(
            state, noise, time_embs[0], s, cache_k, cache_v
        )
        for i in range(1, num_steps):
            x_t = x_t + dt * step(x_t, time_embs[i], s.cos, s.sin, s.mask, cache_k, cache_v)
        return x_t

    # ---- uncached reference (tests) -----------------------------------------------------

    @torch.no_grad()
    def sample_actions_uncached(
        self, images, img_masks, lang_tokens, lang_masks, state, noise, num_steps
    ):
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
        act = self.embed_actions(x_t, self.time_embedding(t))
        suffix = torch.cat([self.state_proj(state.to(self.dtype))[:, None], act], dim=1)
        suffix_ar = torch.zeros(b, chunk + 1, dtype=torch.bool)
        suffix_ar[:, :2] = True
        pad = torch.cat([prefix_pad, torch.ones(b, chunk + 1, dtype=torch.bool)], dim=1)
        ar = torch.cat([torch.zeros_like(prefix_pad), suffix_ar], dim=1)
        mask = additive_mask(make_attn_mask(pad, ar), prefix.dtype)
        positions = torch.cumsum(pad.to(torch.int32), dim=1) - 1
        out = self._joint_layers([prefix, suffix], mask, positions)
        return self.action_out_proj(out[:, -chunk:]).float()

    def _joint_layers(self, streams, mask, positions):
        """Both towers, one joint attention per layer (streams concatenated along T)."""
        towers = (self.llm, self.expert)
        cos, sin = rope_cos_sin(positions, self.config.llm.head_dim, self.config.rope_theta)
        lengths = [s.shape[1] for s in streams]
        starts = [0, lengths[0]]
        for i in range(self.config.llm.depth):
            layers = [tower.layers[i] for tower in towers]
            parts = [
                layer.qkv(x, cos[:, s : s + n], sin[:, s : s + n])
                for layer, x, s, n in zip(layers, streams, starts, lengths)
            ]
            q, k, v = (torch.cat([p[j] for p in parts], dim=1) for j in range(3))
            attn = self.ops.attention(q, k, v, mask).split(lengths, dim=1)
            streams = [layer.finish(x, a) for layer, x, a in zip(layers, streams, attn)]
        return self.expert.norm(streams[1])


def _stack_cameras(images, img_masks):
    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images), dim=1)
    if isinstance(img_masks, (list, tuple)):
        img_masks = torch.stack([torch.as_tensor(m) for m in img_masks], dim=1)
    return images, img_masks.bool()
