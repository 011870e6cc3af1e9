"""Model latency of Pi0 on one GPU: p50/p90/p99 per (batch, cameras, steps), graphs on/off.

    python benchmarks/bench_model.py --preset pi0 --ops native --graphs on off \
        --batch 1 2 4 8 --cameras 1 2 3 --steps 10 20 --iters 30 --out results.json
    python benchmarks/bench_model.py --preset pi05 --batch 1 8      # Pi0.5
    python benchmarks/bench_model.py --preset pi05 --fused auto on  # its adaptive kernels A/B
    python benchmarks/bench_model.py --batch 1 --rtc 5               # + RTC-guided calls
    python benchmarks/bench_model.py --precision bf16 fp8           # engine.precision A/B

Random weights (timing does not depend on values). Times are CUDA-event measurements of the model
call (`policy.sampler`, inputs already on the GPU); `--phases` adds an eager per-phase split.
"""

import argparse
import itertools
import json
import time

import numpy as np
import torch

from flagscale.engine.timing import cuda_times as cuda_time, percentiles
from flagscale.models.pi0 import PI0Policy


def make_inputs(policy, batch, cameras, seed=0):
    obs = []
    for i in range(batch):
        o = policy.example_observation(n_cameras=cameras, seed=seed + i)
        obs.append(o)
    inputs = policy.preprocess(obs)
    inputs["noise"] = policy.make_noise([None] * batch, list(range(batch)))
    return obs, inputs


def decode_ms(iters: int) -> dict:
    """Host time to decode the three 640x480 sample JPEGs the HTTP benchmark sends."""
    from bench_http import sample_images  # this folder (scripts run as benchmarks/...)

    from flagscale.serve import codec

    texts = list(sample_images().values())
    times = []
    for _ in range(iters + 3):
        t = time.perf_counter()
        codec.decode_images(texts)
        times.append((time.perf_counter() - t) * 1e3)
    return {
        "images": len(texts),
        "simplejpeg": codec.simplejpeg is not None,
        **percentiles(times[3:]),
    }


def phase_split(policy, inputs, steps, iters):
    """Eager per-phase times: vision, prefix (language + Gemma), denoise loop (incl. state)."""
    m = policy.model
    images, masks = inputs["images"], inputs["img_masks"]
    b = images.shape[0]
    out = {}
    out["vision_ms"] = percentiles(cuda_time(lambda: m.vision(images.flatten(0, 1)), iters))["p50"]
    embs, pad = m.embed_prefix(images, masks, inputs["lang_tokens"], inputs["lang_masks"])
    k, v = m.new_cache(b, embs.shape[1])
    out["prefix_ms"] = percentiles(cuda_time(lambda: m.fill_prefix_cache(embs, pad, k, v), iters))[
        "p50"
    ]
    state = inputs["state"]
    out["denoise_ms"] = percentiles(
        cuda_time(lambda: m.euler(inputs["noise"], steps, pad, state, k, v), iters)
    )["p50"]
    return out


# --fused -> engine.fused_kernels; "on" / "ops" are true: for Pi0.5 that adds the adaptive
# kernels, which "auto" leaves out (with native ops "auto" is "on" for Pi0)
FUSED_KERNELS = {"auto": "auto", "off": False}


def run(args):
    results = []
    for ops, fused, precision in itertools.product(args.ops, args.fused, args.precision):
        t0 = time.perf_counter()
        policy = PI0Policy.random(
            args.preset,
            device="cuda",
            dtype=args.dtype,
            ops=ops,
            fused_kernels=FUSED_KERNELS.get(fused, True),
            persistent_layers=fused != "ops",  # "ops": five kernels per expert layer
            precision=precision,
        )
        build_s = time.perf_counter() - t0
        for graphs in args.graphs:
            policy.sampler = policy.model.sample_actions
            if graphs == "on":
                policy.enable_cuda_graphs(args.batch, compile=args.compile and ops == "native")
            for b in args.batch:
                for cams in args.cameras:
                    for steps in args.steps:
                        row = one(policy, args, ops, graphs, b, cams, steps, build_s)
                        results.append(dict(row, fused=fused, precision=precision))
                        print(json.dumps(results[-1]), flush=True)
        del policy
        torch.cuda.empty_cache()
    return results


def one(policy, args, ops, graphs, b, cams, steps, build_s):
    obs, inputs = make_inputs(policy, b, cams)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    policy.sampler(**inputs, num_steps=steps)  # first call: capture (graphs) / warm-up
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    times = cuda_time(lambda: policy.sampler(**inputs, num_steps=steps), args.iters)
    row = {
        "ops": ops,
        "graphs": graphs,
        "batch": b,
        "cameras": cams,
        "steps": steps,
        "model_ms": percentiles(times),
        "chunks_per_s": 1000.0 * b / np.median(times),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        "first_call_s": first_s,
        "build_s": build_s,
    }
    e2e, split = [], []
    for _ in range(max(10, args.iters)):
        t = time.perf_counter()
        out = policy.infer_batch(obs, num_steps=steps)
        e2e.append((time.perf_counter() - t) * 1e3)
        split.append(out[0]["timing"])
    row["infer_ms_p50"] = float(np.median(e2e))  # + preprocessing of 640x480 uint8 images
    for part in ("preprocess_ms", "model_ms", "postprocess_ms"):  # host clock, model incl. sync
        row[f"infer_{part}_p50"] = float(np.median([t[part] for t in split]))
    if args.phases and graphs == "off":
        row["phases"] = phase_split(policy, inputs, steps, args.iters)
    if args.rtc is not None:
        row["rtc"] = rtc_times(policy, obs, inputs, steps, args)
    return row


def rtc_times(policy, obs, inputs, steps, args) -> dict:
    """Guided (real-time chunking) model time per gradient mode, beside the unguided call above:
    each row continues the chunk the policy returned for it, `--rtc` actions already executed
    (delay = --rtc too). Guided calls run eagerly (`infer_batch` takes no graph for them)."""
    from flagscale.models.pi0.rtc import RTCConfig, RTCRequest

    out = {"inference_delay": args.rtc}
    previous = policy.infer_batch(obs, num_steps=steps)
    requests = [RTCRequest(r["actions"][args.rtc :], args.rtc) for r in previous]
    for gradient in args.rtc_gradient:
        policy.rtc_config = RTCConfig(gradient=gradient)
        guide = policy.rtc_guidance(requests)
        fn = lambda: policy.model.sample_actions(**inputs, num_steps=steps, rtc=guide)  # noqa: E731
        out[f"{gradient}_ms"] = percentiles(cuda_time(fn, args.iters))
    policy.rtc_config = RTCConfig()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="pi0")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--ops", nargs="+", default=["native"])
    p.add_argument("--graphs", nargs="+", default=["on"], choices=["on", "off"])
    p.add_argument(
        "--fused",
        nargs="+",
        default=["on"],
        choices=["on", "ops", "auto", "off"],
        help="fused Triton kernels: on/ops = fused_kernels true (ops: five per expert layer, not "
        "one persistent launch; Pi0.5: its adaptive kernels too), auto = fused_kernels auto",
    )
    p.add_argument(
        "--precision", nargs="+", default=["bf16"], choices=["bf16", "fp8"], help="engine.precision"
    )
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--cameras", nargs="+", type=int, default=[3])
    p.add_argument("--steps", nargs="+", type=int, default=[10])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--phases", action="store_true")
    p.add_argument(
        "--rtc",
        type=int,
        default=None,
        metavar="DELAY",
        help="also time RTC-guided calls (inference_delay DELAY, the previous chunk's leftover)",
    )
    p.add_argument(
        "--rtc-gradient", nargs="+", default=["lerobot", "vjp"], help="RTC gradient modes to time"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the passes (native)")
    p.add_argument("--no-cudnn", action="store_true", help="disable the cuDNN SDPA backend")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py needs a CUDA GPU")
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "args": vars(args),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    print(json.dumps({"decode_sample_jpegs_ms": decode_ms(args.iters)}), flush=True)
    if args.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    results = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
