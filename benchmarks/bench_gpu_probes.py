"""Two hardware probes behind the expert-layer analysis in docs/benchmarks.md (GPU only).

    python benchmarks/bench_gpu_probes.py [--out probes.json]

- read bandwidth: programs that re-read one shared 100 KB buffer (how the expert's GEMM phases
  re-read their activation tile from L2), programs that read their own L2-resident slices, and
  programs that stream from HBM; 1, 2 and 4 programs per SM.
- grid barriers: a persistent launch (one program per SM) doing nothing, and one doing the five
  grid barriers of the layer kernel (`triton_fused._grid_sync`, counters re-armed as there).
Times are CUDA-graph replays of 50 launches (`bench_kernels.graph_ms`).
"""

import argparse
import json

import torch
import triton
import triton.language as tl

from bench_kernels import CALLS, graph_ms

from flagscale.ops.triton_fused import N_BARRIERS, _grid_sync

READS = 256  # blocks read per program
BLOCK = 4096  # bf16 elements per block


@triton.jit
def _read_kernel(
    ptr, out_ptr, region, SHARED: tl.constexpr, READS: tl.constexpr, BLOCK: tl.constexpr
):
    """Program p reads READS blocks cycling over `region` elements (shared, or its own slice)."""
    pid = tl.program_id(0)
    base = 0 if SHARED else pid * region
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(READS):
        offs = base + (i % (region // BLOCK)) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, cache_modifier=".cg").to(tl.float32)
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


@triton.jit
def _barrier_kernel(bar_ptr, COUNT: tl.constexpr, NPROG: tl.constexpr):
    for i in tl.static_range(COUNT):
        _grid_sync(bar_ptr, i, NPROG)


def read_tbps(programs: int, region_bytes: int, shared: bool) -> float:
    region = region_bytes // 2
    data = torch.randn(region if shared else region * programs, device="cuda").to(torch.bfloat16)
    out = torch.empty(programs * BLOCK, device="cuda")
    kw = dict(SHARED=shared, READS=READS, BLOCK=BLOCK, num_warps=8)
    us = graph_ms(lambda: _read_kernel[(programs,)](data, out, region, **kw))
    return programs * READS * BLOCK * 2 / us / 1e6


def barrier_us(count: int, programs: int) -> float:
    bars = torch.zeros(N_BARRIERS.value, dtype=torch.int32, device="cuda")
    return graph_ms(lambda: _barrier_kernel[(programs,)](bars, COUNT=count, NPROG=programs))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_probes.py needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), "sms": sms, "calls_per_graph": CALLS}
    for per_sm in (1, 2, 4):
        n = per_sm * sms
        row = {
            "shared 100 KB (L2) TB/s": read_tbps(n, 100 << 10, True),
            "own 128 KB slices (L2) TB/s": read_tbps(n, 128 << 10, False),
            "own 2 MB slices (HBM) TB/s": read_tbps(n, 2 << 20, False),
        }
        result[f"{per_sm} program(s) per SM"] = {k: round(v, 2) for k, v in row.items()}
        print(per_sm, "per SM:", result[f"{per_sm} program(s) per SM"], flush=True)
    launch, with_barriers = barrier_us(0, sms), barrier_us(N_BARRIERS.value, sms)
    result["launch us"] = round(launch, 2)
    result["launch with the layer's barriers us"] = round(with_barriers, 2)
    result["us per barrier"] = round((with_barriers - launch) / N_BARRIERS.value, 2)
    print({k: v for k, v in result.items() if k.endswith("us") or k.endswith("barrier")})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
