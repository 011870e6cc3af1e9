"""FlagGems selection on CPU CI: USE_FLAGGEMS parsing, lazy import, clear errors, route overrides.

The route plumbing (layouts, transposes, mask broadcast, GQA flag) is checked against the native
ops with a stand-in `flag_gems` module written in torch (FakeFlagGems); the real kernels are
tested in test_flaggems_gpu.py.
"""

import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from reference_ops import attention_reference

from flagscale.ops import (
    OP_NAMES,
    build_ops,
    flaggems as fgops,
    flaggems_requested,
    native,
    resolve_backend,
)


class FakeFlagGems(types.SimpleNamespace):
    """torch versions of the FlagGems 5.0.2 entry points, with their contracts and asserts."""

    __version__ = "fake"

    def __init__(self):
        super().__init__(calls=[])

    def _log(self, name):
        self.calls.append(name)

    def mm(self, a, b):
        self._log("mm")
        assert a.dim() == 2 and b.dim() == 2
        return a @ b

    def addmm(self, bias, a, b):
        self._log("addmm")
        return torch.addmm(bias, a, b)

    def rms_norm(self, x, shape, weight, eps=1e-5):
        self._log("rms_norm")
        assert isinstance(shape, tuple) and torch.is_tensor(weight)
        y = F.rms_norm(x.float(), shape, eps=eps) * weight.float()
        return y.to(x.dtype)

    def layer_norm(self, x, shape, weight=None, bias=None, eps=1e-5):
        self._log("layer_norm")
        y = F.layer_norm(x.float(), shape, weight.float(), bias.float(), eps).to(x.dtype)
        return y, None, None

    def apply_rotary_pos_emb(self, q, k, cos, sin, position_ids=None, rotary_interleaved=False):
        self._log("rope")
        half = q.shape[-1] // 2
        assert cos.shape[-1] == sin.shape[-1] == half and cos.stride(-1) == sin.stride(-1) == 1
        assert q.shape[:-2] == k.shape[:-2] and position_ids.shape == q.shape[:-2]
        assert int(position_ids.max()) < cos.shape[0], "position id out of bound"

        def rotate(x):
            c, s = cos[position_ids][..., None, :], sin[position_ids][..., None, :]
            x1, x2 = x[..., :half].float(), x[..., half:].float()
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)

        return rotate(q), rotate(k)

    def gelu(self, x, approximate="none"):
        self._log("gelu")
        return F.gelu(x, approximate=approximate)

    def geglu(self, x):
        self._log("geglu")
        gate, up = x.float().chunk(2, dim=-1)
        return (F.gelu(gate, approximate="tanh") * up).to(x.dtype)

    def silu(self, x):
        self._log("silu")
        return F.silu(x)

    def scaled_dot_product_attention(
        self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        self._log("sdpa")
        assert q.shape[-1] in fgops.SDPA_HEAD_DIMS, "FlagGems asserts on this head_dim"
        assert enable_gqa or q.shape[1] == k.shape[1]
        if attn_mask is not None:
            assert attn_mask.dim() == 4 and attn_mask.dtype != torch.bool
            assert attn_mask.shape[:2] == q.shape[:2]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa
        )


@pytest.fixture
def fake(monkeypatch):
    """A stand-in flag_gems, which flaggems_ops then imports instead of the real one."""
    module = FakeFlagGems()
    monkeypatch.setattr(fgops, "load_flag_gems", lambda cache_dir=None: module)
    return module


# ---- USE_FLAGGEMS parsing and backend selection ---------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "Yes", " on "])
def test_use_flaggems_on(value):
    assert flaggems_requested({"USE_FLAGGEMS": value})
    assert resolve_backend("auto", {"USE_FLAGGEMS": value}) == "flaggems"


@pytest.mark.parametrize("value", ["0", "false", "no", "", "off", "2"])
def test_use_flaggems_off(value):
    assert not flaggems_requested({"USE_FLAGGEMS": value})
    assert resolve_backend("auto", {"USE_FLAGGEMS": value}) == "native"


def test_unset_is_off_and_explicit_backend_wins():
    assert not flaggems_requested({})
    assert resolve_backend(None, {}) == "native"
    assert resolve_backend("native", {"USE_FLAGGEMS": "1"}) == "native"
    assert resolve_backend("FlagGems", {}) == "flaggems"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown op backend"):
        build_ops("cudnn")


# ---- lazy import ----------------------------------------------------------------------------


def test_native_never_imports_flag_gems():
    code = (
        "import sys; import flagscale.ops as o; from flagscale.models.pi0 import PI0Policy;"
        "t = o.build_ops('native'); o.build_ops('auto');"
        "PI0Policy.random(preset='tiny', device='cpu', dtype='float32');"
        "import flagscale.ops.flaggems;"
        "assert 'flag_gems' not in sys.modules, 'flag_gems imported';"
        "assert t.routes == {n: 'native' for n in o.OP_NAMES}; print('ok')"
    )
    env = {"USE_FLAGGEMS": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_selected_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="USE_FLAGGEMS=false") as err:
        build_ops("flaggems")
    assert "no CUDA GPU" in str(err.value)
    assert "flag_gems" not in sys.modules


def test_selected_without_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flag_gems", None)  # makes `import flag_gems` fail
    with pytest.raises(ImportError, match="USE_FLAGGEMS=false") as err:
        build_ops("flaggems")
    assert "pip install --no-deps flag-gems==5.0.2" in str(err.value)


def test_auto_with_env_selects_flaggems(monkeypatch):
    monkeypatch.setenv("USE_FLAGGEMS", "yes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="USE_FLAGGEMS=false"):
        build_ops("auto")


def test_cache_dir_is_set_before_import(monkeypatch, tmp_path, fake):
    monkeypatch.delenv("FLAGGEMS_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    seen = {}

    def load(cache_dir=None):
        fgops.configure_cache(cache_dir)
        seen["env"] = dict(FLAGGEMS_CACHE_DIR=fgops.os.environ.get("FLAGGEMS_CACHE_DIR"))
        return fake

    monkeypatch.setattr(fgops, "load_flag_gems", load)
    build_ops("flaggems", cache_dir=str(tmp_path / "fg"))
    assert seen["env"]["FLAGGEMS_CACHE_DIR"] == str(tmp_path / "fg")
    assert fgops.os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "fg" / "triton")
    assert (tmp_path / "fg").is_dir()


# ---- routes ---------------------------------------------------------------------------------


def test_default_routes_and_describe(fake):
    ops = fgops.flaggems_ops()
    assert ops.backend == "flaggems"
    assert set(ops.routes) == set(OP_NAMES)
    assert all(route.startswith("flaggems") for route in ops.routes.values())
    assert "native (fallback: other head_dim e.g. SigLIP 72" in ops.routes["attention"]
    text = ops.describe()
    assert all(f"{name}=" in text for name in OP_NAMES)


def test_per_op_override(monkeypatch, fake):
    monkeypatch.setattr(fgops, "load_flag_gems", lambda cache_dir=None: fake)
    ops = build_ops("flaggems", routes={"linear": "native", "attention": "NATIVE"})
    assert ops.routes["linear"] == ops.routes["attention"] == "native (override)"
    assert ops.linear is native.linear and ops.attention is native.attention
    assert ops.routes["rms_norm"].startswith("flaggems")


def test_all_native_overrides_skip_the_import(monkeypatch):
    def boom(cache_dir=None):
        raise AssertionError("flag_gems must not be imported")

    monkeypatch.setattr(fgops, "load_flag_gems", boom)
    ops = build_ops("flaggems", routes={name: "native" for name in OP_NAMES})
    assert all(r == "native (override)" for r in ops.routes.values())


@pytest.mark.parametrize(
    "routes, message",
    [({"matmul": "native"}, "unknown op"), ({"linear": "cublas"}, "must be one of")],
)
def test_bad_overrides(routes, message, fake):
    with pytest.raises(ValueError, match=message):
        fgops.flaggems_ops(routes=routes)


# ---- route plumbing against native (stand-in kernels, CPU) ----------------------------------


def close(a, b, tol=2e-2):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_plumbing(fake, bias):
    ops = fgops.flaggems_ops()
    x = torch.randn(2, 7, 83, dtype=torch.bfloat16)
    w = torch.randn(33, 83, dtype=torch.bfloat16)
    b = torch.randn(33, dtype=torch.bfloat16) if bias else None
    close(ops.linear(x, w, b), native.linear(x, w, b))
    assert fake.calls == ["addmm" if bias else "mm"]
    fake.calls.clear()
    ops.linear(x.float(), w.float(), None)  # fp32: native (FlagGems' Hopper fp32 mm is tf32x3)
    assert fake.calls == []


def test_norm_and_activation_plumbing(fake):
    ops = fgops.flaggems_ops()
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    w = torch.randn(64) * 0.2
    close(ops.rms_norm(x, w, 1e-6), native.rms_norm(x, w, 1e-6))
    b = torch.randn(64)
    close(ops.layer_norm(x, w + 1, b, 1e-6), native.layer_norm(x, w + 1, b, 1e-6))
    close(ops.gelu_tanh(x), native.gelu_tanh(x))
    close(ops.silu(x), native.silu(x))
    close(ops.geglu(x), native.geglu(x), tol=5e-2)
    assert fake.calls == ["rms_norm", "layer_norm", "gelu", "silu", "geglu"]


@pytest.mark.parametrize("batch", [1, 3])
def test_rope_plumbing(fake, batch):
    """q and k as the composite passes them (views of one q|k|v row), each sample its own
    positions (padding shifts them), the signed half-width tables taken apart correctly."""
    ops = fgops.flaggems_ops()
    heads, dh, t = 4, 16, 7
    qkv = torch.randn(batch, t, (heads + 2) * dh, dtype=torch.bfloat16)
    qk = qkv[..., : (heads + 1) * dh].view(batch, t, heads + 1, dh)
    positions = torch.arange(t)[None] + torch.arange(batch)[:, None] * 3
    cos, sin = native.rope_cos_sin(positions, dh, 10000.0)
    q, k = ops.rope(qk, cos, sin, heads)
    q_ref, k_ref = native.rope(qk, cos, sin, heads)
    close(q, q_ref, tol=1e-2)
    close(k, k_ref, tol=1e-2)
    assert fake.calls == ["rope"]


def test_rms_norm_scale_follows_weight_updates(fake):
    ops = fgops.flaggems_ops()
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    w = torch.zeros(32)
    first = ops.rms_norm(x, w)
    w.add_(1.0)  # in-place update (weight reload) bumps the version: (1 + w) is recomputed
    close(ops.rms_norm(x, w), (first.float() * 2).to(torch.bfloat16))


def mqa_inputs(b=2, lq=5, lk=9, h=4, dh=16, mask_rows=1):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, lq, h, dh, generator=g).bfloat16()
    k = torch.randn(b, lk, 1, dh, generator=g).bfloat16()
    v = torch.randn(b, lk, 1, dh, generator=g).bfloat16()
    keep = torch.ones(b, mask_rows, lk, dtype=torch.bool)
    keep[0, :, 3:6] = False
    mask = torch.where(keep, 0.0, native.MASK_VALUE).bfloat16()
    return q, k, v, mask


@pytest.mark.parametrize("mask_rows", [1, 5])
def test_attention_mqa_masked_plumbing(fake, mask_rows):
    ops = fgops.flaggems_ops()
    q, k, v, mask = mqa_inputs(mask_rows=mask_rows)
    out = ops.attention(q, k, v, mask)
    close(out, attention_reference(q, k, v, mask))
    assert fake.calls == ["sdpa"]


def test_attention_unsupported_head_dim_falls_back(fake, caplog):
    ops = fgops.flaggems_ops()
    q = torch.randn(2, 6, 4, 72, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    close(ops.attention(q, k, v), native.attention(q, k, v))
    assert fake.calls == []  # never reached FlagGems (it asserts on head_dim 72)


def tiny_models(fake):
    from flagscale.models.pi0.config import PI0Config
    from flagscale.models.pi0.modeling_pi0 import PI0Model
    from flagscale.models.pi0.weights import init_random_weights

    config = PI0Config.from_preset("tiny")
    ref = PI0Model(config)
    init_random_weights(ref, seed=0)
    ref = ref.to(torch.bfloat16)
    test = PI0Model(config, fgops.flaggems_ops()).to(torch.bfloat16)
    test.load_state_dict(ref.state_dict())
    return ref.eval(), test.eval(), config


def test_tiny_model_plumbing_matches_native(fake):
    ref, test, c = tiny_models(fake)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 3, c.image_size, c.image_size, generator=g) * 2 - 1
    img_masks = torch.tensor([[True, True, False]])
    lang = torch.randint(0, c.vocab_size, (1, c.tokenizer_max_length), generator=g)
    lang_masks = torch.arange(c.tokenizer_max_length)[None] < 5
    state = torch.randn(1, c.max_state_dim, generator=g)
    noise = torch.randn(1, c.chunk_size, c.max_action_dim, generator=g)
    args = (images, img_masks, lang, lang_masks, state, noise, 3)
    a = ref.sample_actions(*args)
    b = test.sample_actions(*args)
    assert torch.isfinite(b).all()
    rel = (a - b).norm() / a.norm()
    assert rel < 0.03, float(rel)
    names = {"mm", "addmm", "rms_norm", "layer_norm", "rope", "gelu", "geglu", "silu", "sdpa"}
    assert names <= set(fake.calls)
