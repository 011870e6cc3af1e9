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


def exact(u8, size, pad_mode):
    """float64 evaluation of torch's CUDA bilinear formula (fp32 source indices and weights)."""
    g, h, w, _ = u8.shape
    new_h, new_w, top, left = proc.pad_geometry(h, w, size, pad_mode)
    x = u8.permute(0, 3, 1, 2).double().cpu() / 255.0
    f32 = np.float32

    def source(n_in, n_out):
        pos = f32(f32(n_in) / f32(n_out)) * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5)
        pos = np.maximum(pos, f32(0.0)).astype(f32)
        lo = pos.astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), torch.from_numpy((pos - lo).astype(np.float64))

    y0, y1, ly = source(h, new_h)
    x0, x1, lx = source(w, new_w)
    ly, lx = ly[:, None], lx[None, :]
    rows0, rows1 = x[:, :, y0], x[:, :, y1]
    top_row = (1 - lx) * rows0[..., x0] + lx * rows0[..., x1]
    bottom_row = (1 - lx) * rows1[..., x0] + lx * rows1[..., x1]
    out = torch.full((g, 3, size, size), -1.0, dtype=torch.float64)
    inner = ((1 - ly) * top_row + ly * bottom_row).clamp(0.0, 1.0) * 2.0 - 1.0
    out[:, :, top : top + new_h, left : left + new_w] = inner
    return out


# torch's CPU bilinear kernel rounds differently (up to ~7e-6 measured on 640x480 -> 224);
# its CUDA kernel evaluates the formula above in fp32, as the Triton kernel does.
TORCH_TOL = 5e-7 if DEVICE == "cuda" else 1e-5
EXACT_TOL = 5e-7  # a few fp32 ulps of values in [-1, 1]


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
    u8 = frames(g, h, w, seed=h * w)
    geometry = proc.pad_geometry(h, w, size, pad_mode)
    out = triton_image.resize_pad_normalize(u8, geometry, size)
    ref = reference(u8, size, pad_mode)
    assert out.shape == ref.shape == (g, 3, size, size) and out.dtype == torch.float32
    assert (out.cpu().double() - exact(u8, size, pad_mode)).abs().max().item() <= EXACT_TOL
    assert (out - ref).abs().max().item() <= TORCH_TOL
    pad = ref == -1.0
    assert torch.equal(out[pad], ref[pad])  # black padding exactly


def test_camera_size_frames():
    """640x480 frames into 224x224, as the policy sees them."""
    u8 = frames(1, 480, 640, seed=3)
    out = triton_image.resize_pad_normalize(u8, proc.pad_geometry(480, 640, 224), 224)
    assert (out.cpu().double() - exact(u8, 224, "center")).abs().max().item() <= EXACT_TOL
    assert (out - reference(u8, 224, "center")).abs().max().item() <= TORCH_TOL


def test_policy_preprocessing_uses_it_on_cuda_only():
    """prepare_images on CPU keeps the torch ops (the parity path); values agree either way."""
    imgs = [{"a": frames(1, 48, 64, seed=5)[0].cpu().numpy()}]
    images, masks = proc.prepare_images(imgs, ["a"], 32, "center", "cpu")
    ref = reference(torch.from_numpy(imgs[0]["a"])[None], 32, "center")
    assert torch.equal(images[0], ref) and masks.all()
