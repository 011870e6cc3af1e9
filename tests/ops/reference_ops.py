"""Plain eager references for the op tests (not used by the server)."""

import torch


def attention_reference(q, k, v, mask=None, scale=None):
    """Plain eager attention (fp32 logits and softmax, probabilities cast back), for tests."""
    b, lq, h, dh = q.shape
    scale = dh**-0.5 if scale is None else scale
    rep = h // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if mask is not None:
        logits = logits + mask[:, None].float()
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(b, lq, h * dh)


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 numbers that `quantize_rows`' output stands for."""
    return values.float() * scale
