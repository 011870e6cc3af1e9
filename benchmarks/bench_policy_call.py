"""Where a server's policy call goes beyond the CUDA graph (one GPU, B=1, three 640x480 JPEGs).

    python benchmarks/bench_policy_call.py [--gaps 0 4] [--iters 50] [--steps 10]

The inference thread's path with `engine.image_decoder: gpu`, step by step: the request-side half
of the decoder (base64, JPEG headers), nvJPEG decoding, the policy's host preprocessing (resize
kernel launch, prompt tokens, state, noise), the graph launch (copies into the static inputs,
replay) and the wait for the actions on the host. Host clocks (perf_counter) for each step, and
CUDA events on the stream (the GPU idles while the host prepares the inputs: `gpu_pre_ms` is that
gap). `--gaps` sleeps that many ms before each call (a one-client HTTP loop leaves ~4 ms between
calls), to see whether an idle GPU runs the graph slower. Random full-size weights.
"""

import argparse
import json
import time

import numpy as np
import torch

from bench_http import sample_images  # this folder (scripts run as benchmarks/...)

from flagscale.models.pi0 import PI0Policy
from flagscale.serve import codec


def call_split(policy, decoder, texts, steps) -> dict:
    """One policy call as the server makes it: ms per step, host clocks and CUDA events."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
    clocks = [time.perf_counter()]
    events[0].record()
    images = dict(zip(policy.image_keys, decoder(texts)))
    obs = {"images": images, "state": np.zeros(14, np.float32), "prompt": "pick up the cube"}
    clocks.append(time.perf_counter())
    obs = decoder.decode_frames([obs])
    clocks.append(time.perf_counter())
    events[1].record()
    inputs = policy.preprocess(obs)
    inputs["noise"] = policy.make_noise([None], [0])
    clocks.append(time.perf_counter())
    events[2].record()
    out = policy.sampler(**inputs, num_steps=steps)
    clocks.append(time.perf_counter())
    events[3].record()
    out.float().cpu().numpy()
    clocks.append(time.perf_counter())
    events[4].record()
    events[4].synchronize()
    host = ("base64_ms", "decode_ms", "preprocess_ms", "launch_ms", "wait_ms")
    gpu = ("gpu_decode_ms", "gpu_pre_ms", "gpu_graph_ms", "gpu_copy_ms")
    row = {k: (b - a) * 1e3 for k, a, b in zip(host, clocks, clocks[1:])}
    row["host_total_ms"] = (clocks[-1] - clocks[0]) * 1e3
    row.update({k: a.elapsed_time(b) for k, a, b in zip(gpu, events, events[1:])})
    return row


def replay_ms(policy, steps, iters) -> float:
    """The graph alone, replayed back to back (CUDA events), p50."""
    graph = next(g.graph for key, g in policy.sampler.graphs.items() if key[2] == steps)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gaps", nargs="+", type=float, default=[0, 4], help="idle ms before calls")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_policy_call.py needs a CUDA GPU (nvJPEG, CUDA graphs)")
    policy = PI0Policy.random("pi0", device="cuda", dtype="bfloat16", seed=0)
    policy.enable_cuda_graphs((1,))
    decoder = codec.GpuJpegDecoder("cuda")
    texts = list(sample_images().values())
    for _ in range(10):  # capture and warm up
        call_split(policy, decoder, texts, args.steps)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for gap in args.gaps:
        rows = []
        for _ in range(args.iters):
            time.sleep(gap / 1e3)
            rows.append(call_split(policy, decoder, texts, args.steps))
        p50 = {k: round(float(np.median([r[k] for r in rows])), 3) for k in rows[0]}
        print(json.dumps({"gap_ms": gap, "p50": p50}), flush=True)
    print(json.dumps({"replay_back_to_back_ms": round(replay_ms(policy, args.steps, 30), 3)}))


if __name__ == "__main__":
    main()
