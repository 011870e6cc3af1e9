"""The Pi0 prefix GEMMs alone, bf16 vs FP8 (e4m3, per-token x per-channel scales, torch._scaled_mm).

    python benchmarks/bench_fp8_gemms.py [OUT.json]

Per shape (M rows = 816 prefix tokens for Gemma-2B, 768 for SigLIP's three images): bf16 `F.linear`;
FP8 including the activation quantization (`flagscale.ops.fp8.quantize_rows`, composed torch ops);
FP8 GEMM alone (activations quantized beforehand); relative L2 of each vs float64. Four weight
sets cycled (from HBM, as in the model); median of `triton.testing.do_bench`.
"""

import json
import sys

import torch
import torch.nn.functional as F

from triton.testing import do_bench

from flagscale.ops import fp8

SHAPES = {  # name: (M, K, N)
    "gemma_qkv": (816, 2048, 2560),
    "gemma_o": (816, 2048, 2048),
    "gemma_gate_up": (816, 2048, 32768),
    "gemma_down": (816, 16384, 2048),
    "siglip_qkv": (768, 1152, 3456),
    "siglip_o": (768, 1152, 1152),
    "siglip_fc1": (768, 1152, 4304),
    "siglip_fc2": (768, 4304, 1152),
}
COPIES = 4


def scaled_mm(xq, xs, wq, ws):
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)


def cycled(fn, sets):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(sets)
        return fn(*sets[state["i"]])

    return do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3  # us


def one(name, m, k, n):
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(m, k, device="cuda", generator=g).bfloat16() for _ in range(COPIES)]
    ws = [(torch.randn(n, k, device="cuda", generator=g) * k**-0.5).bfloat16() for _ in xs]
    wq = [fp8.quantize_rows(w) for w in ws]
    xq0 = fp8.quantize_rows(xs[0])
    with_quant = lambda x, q: scaled_mm(*fp8.quantize_rows(x), *q)  # noqa: E731
    ref = xs[0].double() @ ws[0].double().t()
    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    return dict(
        shape=name, m=m, k=k, n=n,
        bf16_us=cycled(F.linear, list(zip(xs, ws))),
        fp8_us=cycled(with_quant, list(zip(xs, wq))),
        fp8_gemm_only_us=cycled(lambda q: scaled_mm(*xq0, *q), [(q,) for q in wq]),
        rel_l2_bf16=err(F.linear(xs[0], ws[0])),
        rel_l2_fp8=err(with_quant(xs[0], wq[0])),
    )  # fmt: skip


def main():
    rows = []
    for name, (m, k, n) in SHAPES.items():
        rows.append(one(name, m, k, n))
        print(json.dumps(rows[-1]), flush=True)
    print(f"sum bf16 {sum(r['bf16_us'] for r in rows):.1f} us, FP8 GEMMs alone "
          f"{sum(r['fp8_gemm_only_us'] for r in rows):.1f} us")  # fmt: skip
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
