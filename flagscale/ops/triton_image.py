"""Camera frames -> model images in one Triton kernel (CUDA; the policy's preprocessing).

uint8 [G, H, W, 3] frames (as decoded) -> float32 [G, 3, S, S] in [-1, 1]: the same arithmetic
as `processing.resize_with_pad(frames.permute(0, 3, 1, 2).float() / 255) * 2 - 1` (torch's
bilinear `F.interpolate`, align_corners=False: source index max(scale * (dst + 0.5) - 0.5, 0),
fp32 weights; clamp to [0, 1]; black padding), in one launch instead of seven kernels and three
full-size fp32 intermediates. The products are fused into FMAs exactly as nvcc compiles torch's
CUDA kernel, so the images are bit-identical to the torch path on CUDA (tested on an H200 for
48x64, 20x24, 640x480 and 1280x720 frames).
"""

import numpy as np
import torch
import triton
import triton.language as tl

_INV255 = float(np.float32(1.0) / np.float32(255.0))  # torch divides by a scalar as x * (1 / s)


@triton.jit
def _resize_pad_kernel(
    src_ptr, out_ptr, H, W, new_h, new_w, top, left, scale_h, scale_w, inv255,
    S: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (frame g, output row y): all S columns of the three channels."""
    g, y = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    xx = cols - left
    yy = y - top
    row_width = tl.where((yy >= 0) & (yy < new_h), new_w, 0)  # 0 columns in a padding row
    inside = (cols < S) & (xx >= 0) & (xx < row_width)
    sy = tl.maximum(scale_h * (yy.to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = sy.to(tl.int32)  # sy >= 0: truncation is floor
    y1 = y0 + tl.where(y0 < H - 1, 1, 0)
    ly1 = sy - y0.to(tl.float32)
    ly0 = 1.0 - ly1
    sx = tl.maximum(scale_w * (xx.to(tl.float32) + 0.5) - 0.5, 0.0)
    x0 = sx.to(tl.int32)
    x1 = x0 + tl.where(x0 < W - 1, 1, 0)
    lx1 = sx - x0.to(tl.float32)
    lx0 = 1.0 - lx1
    frame = src_ptr + g.to(tl.int64) * H * W * 3
    row0, row1 = frame + y0 * W * 3, frame + y1 * W * 3
    for c in tl.static_range(3):
        p00 = tl.load(row0 + x0 * 3 + c, inside, other=0).to(tl.float32) * inv255
        p01 = tl.load(row0 + x1 * 3 + c, inside, other=0).to(tl.float32) * inv255
        p10 = tl.load(row1 + x0 * 3 + c, inside, other=0).to(tl.float32) * inv255
        p11 = tl.load(row1 + x1 * 3 + c, inside, other=0).to(tl.float32) * inv255
        # the FMAs torch's CUDA kernel (nvcc contraction) computes: bit-identical results
        upper = tl.fma(lx0, p00, lx1 * p01)
        lower = tl.fma(lx0, p10, lx1 * p11)
        val = tl.fma(ly0, upper, ly1 * lower)
        val = tl.minimum(tl.maximum(val, 0.0), 1.0)
        out = tl.where(inside, val * 2.0 - 1.0, -1.0)
        tl.store(out_ptr + ((g * 3 + c) * S + y) * S + cols, out, cols < S)


def resize_pad_normalize(frames: torch.Tensor, geometry, size: int) -> torch.Tensor:
    """frames uint8 [G, H, W, 3] (contiguous) -> float32 [G, 3, size, size] in [-1, 1].
    geometry: (new_h, new_w, top, left) from `processing.pad_geometry`."""
    g, h, w, _ = frames.shape
    new_h, new_w, top, left = geometry
    assert frames.dtype == torch.uint8 and frames.is_contiguous()
    out = torch.empty(g, 3, size, size, dtype=torch.float32, device=frames.device)
    scale_h = float(np.float32(h) / np.float32(new_h))  # torch: (float)in / out
    scale_w = float(np.float32(w) / np.float32(new_w))
    block = triton.next_power_of_2(size)
    _resize_pad_kernel[(g, size)](
        frames, out, h, w, new_h, new_w, top, left, scale_h, scale_w, _INV255, S=size,
        BLOCK=block, num_warps=max(1, min(8, block // 128)),
    )  # fmt: skip
    return out
