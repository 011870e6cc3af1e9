"""GPU time of the fused Triton kernels vs the composed native ops on Pi0's expert shapes.

    python benchmarks/bench_kernels.py [--batch 1 8] [--copies 8] [--sweep] [--out kernels.json]
    python benchmarks/bench_kernels.py --copies 8 --phases   # the layer kernel, phase by phase

Each op is captured 50 times in one CUDA graph and replayed, so the time per call is GPU time
including the inter-kernel gaps a whole-request graph sees. `--sweep` also tries other launch
configurations (triton_fused.CONFIG) and reports the best per op.
"""

import argparse
import itertools
import json

import torch

from flagscale.models.pi0.config import PRESETS
from flagscale.ops import native_ops, triton_fused as tf
from flagscale.ops.native import rope_cos_sin

CALLS = 50


def graph_ms(fn, reps=5):
    for _ in range(CALLS):  # every weight copy seen once (folded weights built) before capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return sorted(times)[len(times) // 2] * 1e3  # us


def _weight_set(r, d, batch, prefix, total):
    """One layer's weights and KV cache (random, `r`-scaled) for `expert_cases`."""
    cache_k, cache_v = r(batch, total, d.head_dim) * 20, r(batch, total, d.head_dim) * 20
    return dict(
        w_qkv=r((d.heads + 2) * d.head_dim, d.width),
        w_o=r(d.width, d.heads * d.head_dim),
        w_gu=r(2 * d.mlp, d.width),
        w_down=r(d.width, d.mlp),
        ks=cache_k[:, prefix + 1 :],
        vs=cache_v[:, prefix + 1 :],
        kv=(cache_k[:, :, None], cache_v[:, :, None]),
        pkv=(cache_k[:, :prefix, None], cache_v[:, :prefix, None]),
        cache=(cache_k, cache_v),
    )


def expert_cases(batch, prefix=816, chunk=50, tower="expert", copies=1):
    """The ops of one layer of `tower` ("expert", or "llm" with `chunk` prefix tokens). With
    copies > 1 each call takes the next of `copies` sets of weights and caches, so that (with
    enough copies to overflow L2) weights come from HBM as they do in the model, where every
    layer streams its own."""
    d = PRESETS["pi0"][tower]
    dev, bf = "cuda", torch.bfloat16
    r = lambda *s: torch.randn(*s, device=dev).to(bf) * 0.05  # noqa: E731
    x, res = r(batch, chunk, d.width) * 20, r(batch, chunk, d.width) * 20
    norm_w = torch.randn(d.width, device=dev) * 0.1
    attn_in, act = r(batch, chunk, d.heads * d.head_dim) * 20, r(batch, chunk, d.mlp) * 20
    total = prefix + 1 + chunk
    pos = torch.arange(chunk, device=dev)[None].expand(batch, chunk) + prefix + 1
    cos, sin = rope_cos_sin(pos, d.head_dim, 10000.0)
    q = r(batch, chunk, d.heads, d.head_dim) * 20
    mask = torch.zeros(batch, 1, total, device=dev, dtype=bf)
    pq = r(batch, prefix, d.heads, d.head_dim) * 20  # the prefix's attention (llm shapes)
    pmask = torch.zeros(batch, 1, prefix, device=dev, dtype=bf)
    pmask[:, :, prefix - 37 :] = -2.3819763e38  # prompt padding
    sets = [_weight_set(r, d, batch, prefix, total) for _ in range(copies)]
    calls = itertools.count()
    nxt = lambda: sets[next(calls) % copies]  # noqa: E731 (advances per call, also in capture)

    def prefix_attention(ops):
        pk, pv = nxt()["pkv"]
        if ops.fused:  # the long configuration, whatever its max_rows
            return tf.mqa_attention(pq, pk, pv, pmask, config="mqa_attention_long")
        return ops.attention(pq, pk, pv, pmask)

    def qkv_rope(ops, w):
        return ops.qkv_rope(
            x, norm_w, 1e-6, w["w_qkv"], cos, sin, d.heads, 1, d.head_dim, w["ks"], w["vs"]
        )

    def layer_ops(ops, w):  # the layer as five ops (GemmaLayer.cached without decoder_layer)
        h = ops.linear_residual(ops.attention(qkv_rope(ops, w), *w["kv"], mask), w["w_o"], x)
        return ops.linear_residual(ops.norm_geglu(h, norm_w, 1e-6, w["w_gu"]), w["w_down"], h)

    def layer(ops):  # one persistent launch where the table has decoder_layer for the shape
        w = nxt()
        fused = ops.decoder_layer
        weights = (norm_w, w["w_qkv"], w["w_o"], norm_w, w["w_gu"], w["w_down"])
        args = (x, weights, 1e-6, cos, sin, *w["cache"], prefix + 1, mask, d.heads, d.head_dim)
        out = fused(*args) if fused else None
        return layer_ops(ops, w) if out is None else out

    return {
        "layer": layer,
        "layer(ops)": lambda ops: layer_ops(ops, nxt()),
        "attention(prefix)": prefix_attention,
        "qkv_rope": lambda ops: qkv_rope(ops, nxt()),
        "linear_residual(o_proj)": lambda ops: ops.linear_residual(attn_in, nxt()["w_o"], res),
        "norm_geglu": lambda ops: ops.norm_geglu(x, norm_w, 1e-6, nxt()["w_gu"]),
        "linear_residual(down)": lambda ops: ops.linear_residual(act, nxt()["w_down"], res),
        "attention": lambda ops: ops.attention(q, *nxt()["kv"], mask),
    }


SWEEP = {
    "qkv_rope": dict(bm=[16, 64], bn=[16, 32], bk=[64, 128], warps=[4], stages=[3, 4, 6]),
    "norm_geglu": dict(bm=[16, 64], bn=[16, 32], bk=[64, 128], warps=[4], stages=[3, 4, 6]),
    "linear_residual": dict(
        bm=[16, 64], bn=[32, 64], bk=[64, 128], split=[4, 8, 16], warps=[4], stages=[3, 5]
    ),
    "mqa_attention": dict(
        br=[16, 32, 64], bkv=[64, 128], split=[4, 8, 16], warps=[8], stages=[2], merge=["kernel"]
    ),
    "decoder_layer": dict(stages=[3, 4, 5], bkv=[32, 64], a_split=[2, 4]),
    "mqa_attention_long": dict(
        br=[32, 64], bkv=[16, 32, 64], split=[1, 2], warps=[4, 8], stages=[2, 3], merge=["kernel"]
    ),
}
# the dispatcher's tiles for batches of 2+ sweep the same grids
SWEEP.update({f"{key}_batch": SWEEP[key] for key in ("qkv_rope", "mqa_attention")})
SWEPT_BY = {
    "layer": "decoder_layer",
    "qkv_rope": "qkv_rope",
    "linear_residual(o_proj)": "linear_residual",
    "norm_geglu": "norm_geglu",
    "linear_residual(down)": "linear_residual",
    "attention": "mqa_attention",
    "attention(prefix)": "mqa_attention_long",
}


def sweep(key, fn, fused):
    default = dict(tf.CONFIG[key])
    best = (graph_ms(lambda: fn(fused)), default)
    grid = SWEEP[key]
    for values in itertools.product(*grid.values()):
        tf.CONFIG[key] = dict(default, **dict(zip(grid, values)))
        try:
            us = graph_ms(lambda: fn(fused))
        except Exception as err:  # resources exceeded etc.
            print(f"  {key} {tf.CONFIG[key]}: {type(err).__name__}", flush=True)
            continue
        print(f"  {key} {values}: {us:.1f} us", flush=True)
        best = min(best, (us, dict(tf.CONFIG[key])), key=lambda b: b[0])
    tf.CONFIG[key] = default
    return best


PHASE_NAMES = ("qkv_rope", "attention", "merge", "o_proj", "norm_geglu", "down")


def phase_times(layer, fused):
    """The persistent layer kernel with its barriers and one phase at a time (`phases` bit
    masks): us for the barriers alone, each phase over them, and all phases."""
    cfg = tf.CONFIG["decoder_layer"]
    timed = {"barriers only": 0, **{n: 1 << i for i, n in enumerate(PHASE_NAMES)}}
    timed["all"] = tf.ALL_PHASES
    out = {}
    try:
        for name, mask in timed.items():
            cfg["phases"] = mask
            out[name] = round(graph_ms(lambda: layer(fused)), 2)
    finally:
        cfg.pop("phases", None)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--tower", default="expert", choices=["expert", "llm"])
    p.add_argument("--tokens", type=int, default=50, help="rows per sample (the expert: 50)")
    p.add_argument(
        "--sweep", nargs="*", default=None, help="sweep these CONFIG entries (none named: all)"
    )
    p.add_argument(
        "--copies",
        type=int,
        default=1,
        help="weight/cache sets cycled through (8: weights from HBM, as in the model)",
    )
    p.add_argument("--ops", nargs="*", default=None, help="only these cases")
    p.add_argument(
        "--phases", action="store_true", help="time the layer kernel's phases one by one"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    composed, fused = native_ops(), native_ops().with_fused_kernels()
    rows = []
    for batch in args.batch:
        cases = expert_cases(batch, chunk=args.tokens, tower=args.tower, copies=args.copies)
        if args.phases:
            row = {
                "batch": batch,
                "copies": args.copies,
                "phase_us": phase_times(cases["layer"], fused),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        for name, fn in cases.items():
            if args.ops and name not in args.ops:
                continue
            row = {
                "batch": batch,
                "tower": args.tower,
                "tokens": args.tokens,
                "op": name,
                "copies": args.copies,
                "composed_us": graph_ms(lambda: fn(composed)),
            }
            row["fused_us"] = graph_ms(lambda: fn(fused))
            swept = SWEPT_BY.get(name)
            if batch > 1 and f"{swept}_batch" in tf.CONFIG:  # the dispatcher's batch tiles
                swept = f"{swept}_batch"
            if swept and args.sweep is not None and (not args.sweep or swept in args.sweep):
                row["best_us"], row["best_config"] = sweep(swept, fn, fused)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
