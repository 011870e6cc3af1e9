"""The Triton image preprocessing kernel vs the torch ops it replaces (resize_with_pad).

On a GPU the kernel runs compiled and is compared with torch's CUDA kernels; without one it runs
in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1) against torch's CPU kernels.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from flagscale.models.pi0 import processing as proc  # noqa: E402
from flagscale.ops import triton_image  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def frames(g, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (g, h, w, 3), dtype=np.uint8)).to(DEVICE)


def reference(u8, size, pad_mode):
    batch = u8.permute(0, 3, 1, 2).float() / 255.0
    return proc.resize_with_pad(batch, size, pad_mode) * 2.0 - 1.0


def check(u8, size, pad_mode):
    out = triton_image.resize_pad_normalize(
        u8, proc.pad_geometry(*u8.shape[1:3], size, pad_mode), size
    )
    ref = reference(u8, size, pad_mode)
    assert out.shape == ref.shape == (u8.shape[0], 3, size, size) and out.dtype == torch.float32
    if DEVICE == "cuda":  # the same FMAs as torch's CUDA kernel: bit-identical
        assert torch.equal(out, ref)
    else:  # the interpreter rounds each fma twice, torch's CPU kernel its own way: the source
        # coordinates (up to ~640) differ by an ulp (~6e-5), the values by up to ~7e-6 measured;
        # a wrong index or weight would be off by ~1e-2 and more
        assert (out - ref).abs().max().item() <= 1e-5
        pad = ref == -1.0
        assert torch.equal(out[pad], ref[pad])  # black padding exactly


@pytest.mark.parametrize("pad_mode", ["center", "top_left"])
@pytest.mark.parametrize(
    "g,h,w,size",
    [
        (3, 48, 64, 32),  # landscape: rows padded
        (2, 64, 40, 32),  # portrait: columns padded
        (1, 32, 32, 32),  # already the model size: values only rescaled
        (1, 7, 100, 32),  # extreme aspect: 2 rows
        (1, 31, 33, 16),  # odd sizes, downscale by ~2
        (2, 20, 24, 32),  # upscale
    ],
)
def test_matches_torch_resize_with_pad(g, h, w, size, pad_mode):
    check(frames(g, h, w, seed=h * w), size, pad_mode)


def test_camera_size_frames():
    """640x480 frames into 224x224, as the policy sees them."""
    check(frames(2, 480, 640, seed=3), 224, "center")


def test_policy_preprocessing_uses_it_on_cuda_only():
    """prepare_images on CPU keeps the torch ops (the parity path); values agree either way."""
    imgs = [{"a": frames(1, 48, 64, seed=5)[0].cpu().numpy()}]
    images, masks = proc.prepare_images(imgs, ["a"], 32, "center", "cpu")
    ref = reference(torch.from_numpy(imgs[0]["a"])[None], 32, "center")
    assert torch.equal(images[0], ref) and masks.all()
