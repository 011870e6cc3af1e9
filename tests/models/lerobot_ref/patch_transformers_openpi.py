"""Apply openpi's `transformers_replace` changes to a stock transformers==4.53.2 install.

LeRobot 0.4.x (the PyPI release of its G2 "openpi port" PI0) does not run on stock transformers: its
`PI0Pytorch.__init__` calls `transformers.models.siglip.check.check_whether_transformers_replace_is_installed_correctly()`
and its layer code needs `GemmaRMSNorm(x, cond=...) -> (y, gate)`, `modeling_gemma._gated_residual`, a
Gemma attention that *reads* a prefix KV cache without appending to it, no sqrt(width) input
normaliser inside `GemmaModel`, and no 1/sqrt(width) division in `PaliGemmaModel.get_image_features`.
LeRobot's pyproject pins a transformers git branch for this (`fix/lerobot_openpi`), which PyPI cannot
serve; openpi instead copies `src/openpi/models_pytorch/transformers_replace/*` over a
transformers==4.53.2 install. This script makes the same edits, textually, to the installed files
(only the parts LeRobot's PI0 code path uses, plus SigLIP's bf16 encoder input that a bf16 model
needs; the ada-RMSNorm branch is pi0.5-only and kept as in openpi). Run it with the Python of the *separate* LeRobot venv; it refuses any other version and is
idempotent.

    /tmp/lrvenv/bin/python tests/models/lerobot_ref/patch_transformers_openpi.py
"""

import os
import sys

import transformers

MARK = "# openpi transformers_replace (applied by flagscale tests)"

RMSNORM_OLD = '''class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        # Llama does x.to(float16) * w whilst Gemma is (x * w).to(float16)
        # See https://github.com/huggingface/transformers/pull/29402
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
'''

RMSNORM_NEW = MARK + '''
class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: Optional[int] = None):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.cond_dim = cond_dim
        if cond_dim is not None:
            self.dense = nn.Linear(cond_dim, dim * 3, bias=True)
            nn.init.zeros_(self.dense.weight)
        else:
            self.weight = nn.Parameter(torch.zeros(dim, dtype=torch.bfloat16))
            self.dense = None

    def _norm(self, x):
        var = torch.mean(torch.square(x.float()), dim=-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps)

    def forward(self, x, cond=None):
        dtype = x.dtype
        normed_inputs = self._norm(x)
        if cond is None or self.dense is None:
            normed_inputs = normed_inputs * (1.0 + self.weight.float())
            return normed_inputs.to(dtype), None
        if cond.shape[-1] != self.cond_dim:
            raise ValueError(f"Expected cond dimension {self.cond_dim}, got {cond.shape[-1]}")
        modulation = self.dense(cond)
        if len(x.shape) == 3:
            modulation = modulation.unsqueeze(1)
        scale, shift, gate = torch.chunk(modulation, 3, dim=-1)
        normed_inputs = normed_inputs * (1 + scale.to(torch.float32)) + shift.to(torch.float32)
        return normed_inputs.to(dtype), gate.to(dtype)

    def extra_repr(self):
        return f"dim={self.dim}, eps={self.eps}, cond_dim={self.cond_dim}"
'''

GATED = '''def _gated_residual(x, y, gate):
    if x is None and y is None:
        return None
    if x is None or y is None:
        return x if x is not None else y
    if gate is None:
        return x + y
    return x + y * gate


def eager_attention_forward('''

CACHE_OLD = '''        if past_key_value is not None:
            # sin and cos are specific to RoPE models; cache_position needed for the static cache
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
            key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx, cache_kwargs)
'''
CACHE_NEW = '''        if past_key_value is not None:
            if use_cache:
                cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
                key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx, cache_kwargs)
            else:
                key_states = torch.cat([past_key_value[self.layer_idx][0], key_states], dim=2)
                value_states = torch.cat([past_key_value[self.layer_idx][1], value_states], dim=2)
'''

COND = (
    "        cond_dim = getattr(config, 'adarms_cond_dim', None) "
    "if getattr(config, 'use_adarms', False) else None\n"
)

GEMMA_EDITS = [
    (RMSNORM_OLD, RMSNORM_NEW),
    ("def eager_attention_forward(", GATED),
    (
        "        position_embeddings: tuple[torch.Tensor, torch.Tensor],\n"
        "        attention_mask: Optional[torch.Tensor],\n"
        "        past_key_value: Optional[Cache] = None,\n"
        "        cache_position: Optional[torch.LongTensor] = None,\n",
        "        position_embeddings: tuple[torch.Tensor, torch.Tensor],\n"
        "        attention_mask: Optional[torch.Tensor],\n"
        "        past_key_value: Optional[Cache] = None,\n"
        "        cache_position: Optional[torch.LongTensor] = None,\n"
        "        use_cache: bool = False,\n",
    ),
    (CACHE_OLD, CACHE_NEW),
    (
        "        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n"
        "        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n",
        COND
        + "        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, cond_dim=cond_dim)\n"
        "        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, cond_dim=cond_dim)\n",
    ),
    (
        "        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,  # necessary, but kept here for BC\n"
        "        **kwargs",
        "        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,  # necessary, but kept here for BC\n"
        "        adarms_cond: Optional[torch.Tensor] = None,\n"
        "        **kwargs",
    ),
    (
        "        hidden_states = self.input_layernorm(hidden_states)\n",
        "        hidden_states, gate = self.input_layernorm(hidden_states, adarms_cond)\n",
    ),
    (
        "        hidden_states = residual + hidden_states\n\n        # Fully Connected\n",
        "        hidden_states = _gated_residual(residual, hidden_states, gate)\n\n        # Fully Connected\n",
    ),
    (
        "        hidden_states = self.post_attention_layernorm(hidden_states)\n"
        "        hidden_states = self.mlp(hidden_states)\n"
        "        hidden_states = residual + hidden_states\n",
        "        hidden_states, gate = self.post_attention_layernorm(hidden_states, adarms_cond)\n"
        "        hidden_states = self.mlp(hidden_states)\n"
        "        hidden_states = _gated_residual(residual, hidden_states, gate)\n",
    ),
    (
        "        elif isinstance(module, GemmaRMSNorm):\n            module.weight.data.fill_(1.0)\n",
        "        elif isinstance(module, GemmaRMSNorm):\n"
        "            if hasattr(module, 'weight'):\n"
        "                module.weight.data.fill_(1.0)\n",
    ),
    (
        "        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n",
        COND
        + "        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, cond_dim=cond_dim)\n",
    ),
    (
        "        cache_position: Optional[torch.LongTensor] = None,\n"
        "        **kwargs: Unpack[FlashAttentionKwargs],\n"
        "    ) -> BaseModelOutputWithPast:\n",
        "        cache_position: Optional[torch.LongTensor] = None,\n"
        "        adarms_cond: Optional[torch.Tensor] = None,\n"
        "        **kwargs: Unpack[FlashAttentionKwargs],\n"
        "    ) -> BaseModelOutputWithPast:\n",
    ),
    (
        "        hidden_states = inputs_embeds\n\n        # create position embeddings",
        "        hidden_states = inputs_embeds\n"
        "        if len(self.layers) > 0 and self.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:\n"
        "            hidden_states = hidden_states.to(torch.bfloat16)\n\n"
        "        # create position embeddings",
    ),
    (
        "        hidden_states = hidden_states * normalizer\n",
        "        # openpi: no sqrt(hidden_size) input normaliser (pi0 scales language embeddings itself)\n",
    ),
    (
        "                position_embeddings=position_embeddings,\n                **kwargs,\n            )\n\n"
        "            hidden_states = layer_outputs[0]\n",
        "                position_embeddings=position_embeddings,\n                adarms_cond=adarms_cond,\n"
        "                **kwargs,\n            )\n\n            hidden_states = layer_outputs[0]\n",
    ),
    (
        "        hidden_states = self.norm(hidden_states)\n",
        "        hidden_states, _ = self.norm(hidden_states, adarms_cond)\n",
    ),
]

PALIGEMMA_EDITS = [
    (
        "        image_features = image_features / (self.config.text_config.hidden_size**0.5)\n",
        "        " + MARK + ": no 1/sqrt(hidden_size) on image features\n",
    )
]

SIGLIP_EDITS = [
    (
        "        hidden_states = self.embeddings(pixel_values, "
        "interpolate_pos_encoding=interpolate_pos_encoding)\n",
        "        hidden_states = self.embeddings(pixel_values, "
        "interpolate_pos_encoding=interpolate_pos_encoding)\n"
        "        " + MARK + ": bf16 encoder input when the encoder is bf16\n"
        "        if len(self.encoder.layers) > 0 and "
        "self.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:\n"
        "            hidden_states = hidden_states.to(torch.bfloat16)\n",
    )
]

CHECK = (
    "import transformers\n\n\n"
    "def check_whether_transformers_replace_is_installed_correctly():\n"
    '    return transformers.__version__ == "4.53.2"\n'
)


def _patch(path, edits):
    with open(path) as f:
        text = f.read()
    if MARK in text:
        return False
    for old, new in edits:
        if text.count(old) != 1:
            raise SystemExit(f"{path}: expected exactly one occurrence of:\n{old}")
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)
    return True


def main():
    if transformers.__version__ != "4.53.2":
        raise SystemExit(f"needs transformers==4.53.2, found {transformers.__version__}")
    root = os.path.dirname(transformers.__file__)
    done = [
        _patch(os.path.join(root, "models/gemma/modeling_gemma.py"), GEMMA_EDITS),
        _patch(os.path.join(root, "models/paligemma/modeling_paligemma.py"), PALIGEMMA_EDITS),
        _patch(os.path.join(root, "models/siglip/modeling_siglip.py"), SIGLIP_EDITS),
    ]
    with open(os.path.join(root, "models/siglip/check.py"), "w") as f:
        f.write(CHECK)
    print("patched" if any(done) else "already patched", root)


if __name__ == "__main__":
    sys.exit(main())
