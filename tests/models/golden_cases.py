"""Golden-action cases: small Pi0 models, inputs and noise that are the same on every machine.

The committed arrays (`tests/models/golden/pi0_<case>.npz`) are LeRobot's PI0 actions for these
cases, written by the lerobot parity run (`PI0_WRITE_GOLDEN=1`, see docs/parity.md) and checked
there on every run; `test_pi0_golden.py` compares our model with them in CI, where lerobot is not
installed. Weights and inputs are drawn with numpy's PCG64 generator, not torch's: torch's
`normal_` gives other bits on CPUs without AVX2 (its vectorised Box-Muller), and the golden
values must not depend on the CPU that reads them. Each parameter's stream is seeded by its name,
so reordering the model's parameters keeps the values; renaming one needs new golden arrays.
"""

import os
import zlib

import numpy as np
import torch

from flagscale.models.pi0 import PI0Config, PI0Model
from flagscale.models.pi0.config import GEMMA_VARIANTS, PRESETS, TowerDims

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
STEPS = (1, 10)
BATCH, CAMERAS = 2, 3
IMAGE_MASKS = ((True, True, False), (True, False, True))  # a masked camera in each sample
VALID_TOKENS = (11, 30)  # of tokenizer_max_length (48): padded prompts

CASES = {
    # the tiny preset the demo and the tests serve
    "tiny": PRESETS["tiny"],
    # the lerobot parity test's model: openpi's "dummy" prefix tower, full vocabulary
    "dummy": dict(
        PRESETS["tiny"],
        llm=GEMMA_VARIANTS["dummy"],
        expert=TowerDims(width=32, depth=4, mlp=64, heads=8, kv_heads=1, head_dim=16),
        vocab_size=257152,
    ),
}


def golden_path(case: str) -> str:
    return os.path.join(GOLDEN_DIR, f"pi0_{case}.npz")


def config(case: str) -> PI0Config:
    return PI0Config(preset="custom", **CASES[case])


def model(case: str, seed: int = 0) -> PI0Model:
    """Our model for `case` with portable random weights (fan-in scaled normals; norm weights
    randomised so a (w) vs (1 + w) mix-up cannot hide; LayerNorm weights around 1)."""
    with torch.device("meta"):
        m = PI0Model(config(case))
    m = m.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, param in m.named_parameters():  # a stream per name: independent of the order
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            param.copy_(torch.from_numpy(_draw(rng, name, tuple(param.shape))))
    return m


def _draw(rng, name: str, shape: tuple) -> np.ndarray:
    if name.endswith("norm.weight"):  # Gemma RMSNorm: (1 + w)
        return rng.uniform(-0.2, 0.2, shape).astype(np.float32)
    if name.endswith(("ln1.weight", "ln2.weight", "post_ln.weight")):  # LayerNorm: w
        return rng.uniform(0.8, 1.2, shape).astype(np.float32)
    if name.endswith("bias") or name == "vision.pos_embed":
        scale = 0.02
    elif name == "llm.embed":
        scale = shape[1] ** -0.5
    else:
        scale = int(np.prod(shape[1:])) ** -0.5  # fan-in
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def inputs(case: str, seed: int = 1) -> dict:
    """sample_actions' tensor inputs (lerobot conventions: images in [-1, 1], pad id 0)."""
    cfg = config(case)
    rng = np.random.default_rng(seed)
    s, n = cfg.image_size, cfg.tokenizer_max_length
    images = rng.uniform(-1, 1, (BATCH, CAMERAS, 3, s, s)).astype(np.float32)
    lang_masks = np.arange(n)[None, :] < np.array(VALID_TOKENS)[:, None]
    tokens = rng.integers(1, cfg.vocab_size, (BATCH, n)) * lang_masks
    state = rng.standard_normal((BATCH, cfg.max_state_dim)).astype(np.float32)
    noise = rng.standard_normal((BATCH, cfg.chunk_size, cfg.max_action_dim)).astype(np.float32)
    return {
        "images": torch.from_numpy(images).clone(),
        "img_masks": torch.tensor(IMAGE_MASKS),
        "lang_tokens": torch.from_numpy(tokens).long(),
        "lang_masks": torch.from_numpy(lang_masks),
        "state": torch.from_numpy(state).clone(),
        "noise": torch.from_numpy(noise).clone(),
    }


def tolerance(golden: np.ndarray) -> float:
    """float32 across CPUs and summation orders: 1e-5 of the actions' scale (~5e-5 here). Ours vs
    LeRobot measured at most 4.3e-6, also with torch's and MKL's AVX2 or non-SIMD kernels forced
    (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS); a convention error moves actions by percents."""
    return 1e-5 * max(1.0, float(np.abs(golden).max()))
