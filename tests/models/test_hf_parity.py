"""Independent check: our SigLIP and Gemma blocks against transformers' own implementations
(used here only as a reference; the serving path never uses transformers model classes)."""

import pytest
import torch

from flagscale.models.pi0 import PI0Config, PI0Model
from flagscale.models.pi0.modeling_pi0 import additive_mask, rope_cos_sin
from flagscale.models.pi0.weights import export_state, init_random_weights

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    with torch.device("meta"):
        m = PI0Model(PI0Config.from_preset("tiny"))
    m = m.to_empty(device="cpu")
    init_random_weights(m, seed=1)
    return m.eval()


def _sub_state(model, prefix):
    state = export_state(model, layout="openpi", include_unused=False)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _sizes(d) -> dict:
    """The size arguments transformers' SiglipVisionConfig and GemmaConfig both take."""
    return dict(
        hidden_size=d.width,
        intermediate_size=d.mlp,
        num_hidden_layers=d.depth,
        num_attention_heads=d.heads,
    )


def _siglip(v) -> dict:
    """transformers' SiglipVisionConfig arguments for our VisionDims `v` (no pooling head)."""
    return dict(
        _sizes(v),
        image_size=v.image_size,
        patch_size=v.patch,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def _gemma(c) -> dict:
    """transformers' GemmaConfig arguments for our config `c`'s prefix tower."""
    return dict(
        _sizes(c.llm),
        vocab_size=c.vocab_size,
        num_key_value_heads=c.llm.kv_heads,
        head_dim=c.llm.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
    )


def test_siglip_matches_transformers(model):
    d = model.config.vision
    cfg = transformers.SiglipVisionConfig(**_siglip(d), attn_implementation="eager")
    hf = transformers.SiglipVisionModel(cfg).eval()
    state = _sub_state(model, "paligemma_with_expert.paligemma.model.vision_tower.")
    own = set(hf.state_dict())
    if not any(k.startswith("vision_model.") for k in own):  # transformers >= 5 drops the prefix
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k or k.startswith("head.") for k in missing)
    images = torch.rand(2, 3, d.image_size, d.image_size) * 2 - 1
    with torch.no_grad():
        ref = hf(pixel_values=images).last_hidden_state
        ref = torch.nn.functional.linear(
            ref, model.vision.projector.weight, model.vision.projector.bias
        )
        ours = model.vision(images)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_gemma_tower_matches_transformers(model):
    d = model.config.llm
    cfg = transformers.GemmaConfig(
        **_gemma(model.config), rope_theta=10000.0, attn_implementation="eager"
    )
    hf = transformers.GemmaModel(cfg).eval()
    state = _sub_state(model, "paligemma_with_expert.paligemma.model.language_model.")
    state["embed_tokens.weight"] = model.llm.embed.detach().clone()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    tokens = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = hf(input_ids=tokens).last_hidden_state  # causal attention, positions 0..10
        x = model.llm.embed[tokens] * d.width**0.5
        pos = torch.arange(11)[None].expand(2, 11)
        cos, sin = rope_cos_sin(pos, d.head_dim, 10000.0)
        mask = additive_mask(
            torch.ones(11, 11, dtype=torch.bool).tril()[None].expand(2, 11, 11), x.dtype
        )
        for layer in model.llm.layers:
            q, k, v = layer.qkv(x, cos, sin)
            x = layer.finish(x, model.ops.attention(q, k, v, mask))
        ours = model.llm.norm(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def _paligemma(model):
    """transformers' PaliGemma with our weights (openpi layout, `vision_model.` dropped by 5.x)."""
    c = model.config
    v, t = c.vision, c.llm
    vision = dict(_siglip(v), model_type="siglip_vision_model", projection_dim=t.width)
    text = dict(_gemma(c), model_type="gemma")
    cfg = transformers.PaliGemmaConfig(
        vision_config=vision, text_config=text, projection_dim=t.width, vocab_size=c.vocab_size
    )
    hf = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    prefix = "paligemma_with_expert.paligemma."
    state = {k[len(prefix) :]: v for k, v in _sub_state(model, "").items() if k.startswith(prefix)}
    if not any(".vision_model." in k for k in hf.state_dict()):
        state = {
            k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in state.items()
        }
    state["model.language_model.embed_tokens.weight"] = state["lm_head.weight"]  # tied
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf


def test_embed_prefix_matches_transformers_paligemma(model):
    """The whole prefix embedding: each camera through PaliGemma's image features (SigLIP +
    projector, no 1/sqrt(width) on image features), then the prompt through its Gemma token
    embedding (scaled by sqrt(width)); masks: a masked camera's tokens and prompt padding."""
    hf = _paligemma(model)
    g = torch.Generator().manual_seed(5)
    s, n = model.config.image_size, 12
    images = torch.rand(2, 3, 3, s, s, generator=g) * 2 - 1
    img_masks = torch.tensor([[True, False, True], [True, True, True]])
    tokens = torch.randint(1, model.config.vocab_size, (2, n), generator=g)
    lang_masks = torch.arange(n)[None] < torch.tensor([[5], [n]])
    with torch.no_grad():
        embs, pad = model.embed_prefix(images, img_masks, tokens * lang_masks, lang_masks)
        cams = [hf.model.get_image_features(images[:, i]).pooler_output for i in range(3)]
        lang = hf.model.language_model.embed_tokens(tokens * lang_masks)
    per_cam = cams[0].shape[1]
    torch.testing.assert_close(embs, torch.cat([*cams, lang], 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(pad, torch.cat([img_masks.repeat_interleave(per_cam, 1), lang_masks], 1))
