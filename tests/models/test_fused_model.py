"""The whole model with the fused Triton kernels vs the composed ops (bf16, fixed noise).

Without a GPU the kernels run in Triton's interpreter (conftest), with dims they support.
"""

import pytest
import torch

pytest.importorskip("triton")

from flagscale.models.pi0.config import PI0Config, TowerDims  # noqa: E402
from flagscale.models.pi0.modeling_pi0 import PI0Model  # noqa: E402
from flagscale.models.pi0.weights import init_random_weights  # noqa: E402
from flagscale.ops import build_ops, fused_routes, native_ops, triton_fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ADAPTIVE_KERNELS = ("ada_rms_norm", "ada_qkv_rope", "ada_norm_geglu", "linear_gated_residual")
TOWER = TowerDims(width=128, depth=2, mlp=128, heads=2, kv_heads=1, head_dim=64)


def build(ops, dtype, preset="tiny"):
    config = PI0Config.from_preset(preset, llm=TOWER, expert=TOWER, tokenizer_max_length=48)
    with torch.device("meta"):
        model = PI0Model(config, ops)
    model = model.to_empty(device=DEVICE)
    init_random_weights(model, seed=0)
    return model.to(dtype).eval()


def inputs(config, batch, cameras=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images = torch.rand(batch, cameras, 3, size, size, generator=g) * 2 - 1
    n = config.tokenizer_max_length
    lang = torch.randint(0, config.vocab_size, (batch, n), generator=g)
    lang_masks = torch.arange(n)[None].expand(batch, n) < 11
    lang_masks = lang_masks.clone()
    img_masks = torch.ones(batch, cameras, dtype=torch.bool)
    img_masks[0, -1] = False  # a missing camera
    state = torch.randn(batch, config.max_state_dim, generator=g)
    noise = torch.randn(batch, config.chunk_size, config.max_action_dim, generator=g)
    return [t.to(DEVICE) for t in (images, img_masks, lang, lang_masks, state, noise)]


def rel_l2(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def check_as_close_as_composed(fused, preset, args, num_steps):
    """The fused bf16 model's actions are finite and about as close to the composed float32
    model's as the composed bf16 model's are (relative L2)."""
    want = build(native_ops(), torch.float32, preset).sample_actions(*args, num_steps=num_steps)
    composed = build(native_ops(), torch.bfloat16, preset)
    err_composed = rel_l2(composed.sample_actions(*args, num_steps=num_steps), want)
    out = fused.sample_actions(*args, num_steps=num_steps)
    assert torch.isfinite(out).all()
    err_fused = rel_l2(out, want)
    assert err_fused <= 1.5 * err_composed + 1e-3, (err_fused, err_composed)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of each fused Triton kernel (spied on; they still run)."""
    calls = {"qkv_rope": 0, "mqa_attention": 0, "decoder_layer": 0}
    calls.update(dict.fromkeys(ADAPTIVE_KERNELS, 0))
    for name in calls:
        real = getattr(triton_fused, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(triton_fused, name, spy)
    return calls


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_model_matches_composed(batch, kernel_calls):
    fused = build(native_ops().with_fused_kernels(), torch.bfloat16)
    check_as_close_as_composed(fused, "tiny", inputs(fused.config, batch), num_steps=3)
    # the expert passes (3 steps, the first with the state token; 2 layers each) used the kernels:
    # one launch per layer up to MAX_ROWS["decoder_layer"] (batch 1), five kernels above
    if batch * 51 <= fused_routes.MAX_ROWS["decoder_layer"]:
        assert kernel_calls["decoder_layer"] == 2 * 3
    else:
        assert kernel_calls["qkv_rope"] >= 2 * 3 and kernel_calls["mqa_attention"] >= 2 * 3


def test_pi05_expert_keeps_composed_ops_with_fused_kernels_auto(kernel_calls, caplog):
    """fused_kernels "auto" (the table `build_ops` makes for a CUDA device; here only a name):
    Pi0.5's expert runs its composed adaptive ops (one log line) except attention; the prefix
    keeps the fused kernels; the result is as close as composed."""
    with caplog.at_level("INFO"):
        fused = build(build_ops(device="cuda", fused="auto"), torch.bfloat16, "pi05_tiny")
    assert "adaptive norms and gated residuals run composed ops" in caplog.text
    check_as_close_as_composed(fused, "pi05_tiny", inputs(fused.config, 1, cameras=2), num_steps=2)
    # the (short) prefix's layers take the fused qkv_rope, the expert's never; 2 steps x 2 expert
    # layers go through the fused MQA attention kernel
    assert kernel_calls["decoder_layer"] == 0 and kernel_calls["qkv_rope"] == fused.config.llm.depth
    assert kernel_calls["mqa_attention"] >= 2 * 2
    assert all(kernel_calls[name] == 0 for name in ADAPTIVE_KERNELS)


def test_pi05_expert_runs_adaptive_kernels_with_fused_kernels_true(kernel_calls, caplog):
    """fused_kernels true: every adaptive op of the expert takes its kernel (2 steps x 2 layers;
    the final norm once per step), and the actions are as close as the composed ops'."""
    with caplog.at_level("INFO"):
        fused = build(build_ops(device="cuda", fused=True), torch.bfloat16, "pi05_tiny")
    assert "run the fused adaptive kernels" in caplog.text
    check_as_close_as_composed(fused, "pi05_tiny", inputs(fused.config, 1, cameras=2), num_steps=2)
    layers = 2 * fused.config.expert.depth
    assert kernel_calls["ada_qkv_rope"] == layers and kernel_calls["ada_norm_geglu"] == layers
    assert kernel_calls["linear_gated_residual"] == 2 * layers
    # one norm inside each ada_qkv_rope / ada_norm_geglu, plus the final norm
    assert kernel_calls["ada_rms_norm"] == 2 * layers + 2
    assert kernel_calls["decoder_layer"] == 0 and kernel_calls["qkv_rope"] >= layers


def test_policy_fused_kernels_selection():
    from flagscale.models.pi0 import PI0Policy

    assert not PI0Policy.random("tiny", device="cpu").model.ops.fused  # auto: CUDA only
    with pytest.raises(ValueError, match="CUDA"):
        PI0Policy.random("tiny", device="cpu", fused_kernels=True)


@pytest.mark.parametrize("backend", ["native", "flaggems"])
def test_long_inputs_keep_other_backends_ops(backend, monkeypatch):
    """With FlagGems, the fused kernels take the expert's short inputs only: prefix-sized inputs
    stay on the backend's own composites instead of the cuBLAS-based long path."""
    from flagscale.ops import build_ops

    table = build_ops("native")
    table.backend = backend  # a stand-in for the FlagGems table (same op signatures)
    calls = []
    for name in ("long_norm_geglu", "long_linear_residual", "norm_geglu"):
        real = getattr(triton_fused, name)
        spy = lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a)  # noqa: E731
        monkeypatch.setattr(triton_fused, name, spy)
    fused = table.with_fused_kernels()
    g = torch.Generator().manual_seed(0)
    long_x = torch.randn(1, 300, 128, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(256, 128, generator=g) * 0.05).to(DEVICE, torch.bfloat16)
    w_out = (torch.randn(128, 128, generator=g) * 0.05).to(DEVICE, torch.bfloat16)
    norm_w = torch.zeros(128, dtype=torch.bfloat16, device=DEVICE)
    out = fused.norm_geglu(long_x, norm_w, 1e-6, w)
    fused.linear_residual(out, w_out, long_x)
    fused.norm_geglu(long_x[:, :40], norm_w, 1e-6, w)  # short: the fused kernel either way
    expected = ["long_norm_geglu", "long_linear_residual"] if backend == "native" else []
    assert calls == expected + ["norm_geglu"]
    torch.testing.assert_close(out, table.composed["norm_geglu"](long_x, norm_w, 1e-6, w))
