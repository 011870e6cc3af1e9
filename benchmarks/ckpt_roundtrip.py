"""Full-size checkpoint round trip: write a random Pi0 checkpoint in the lerobot layout (float32,
like lerobot/pi0), then load it in a fresh process and time load + graph capture.

    python benchmarks/ckpt_roundtrip.py write DIR      # random full-size weights -> DIR
    python benchmarks/ckpt_roundtrip.py load DIR       # load, warm up/capture, compare, report
"""

import json
import os
import resource
import sys
import time

import numpy as np
import torch

from flagscale.models.pi0 import PI0Policy
from flagscale.models.pi0.tokenizer import build_test_tokenizer
from flagscale.models.pi0.weights import save_pretrained


def write(out_dir):
    policy = PI0Policy.random("pi0", device="cuda", dtype="bfloat16", seed=0)
    t0 = time.perf_counter()
    save_pretrained(policy.model, out_dir, layout="lerobot", dtype=torch.float32)
    build_test_tokenizer(out_dir)
    ref = policy.infer(policy.example_observation(), seed=0)["actions"]
    np.save(os.path.join(out_dir, "reference_actions.npy"), ref)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(json.dumps({"write_s": time.perf_counter() - t0, "bytes": size}))


def load(ckpt_dir):
    t0 = time.perf_counter()
    policy = PI0Policy.from_pretrained(ckpt_dir, device="cuda", dtype="bfloat16")
    load_s = time.perf_counter() - t0
    policy.enable_cuda_graphs((1,))
    policy.warmup([1])
    ready_s = time.perf_counter() - t0
    out = policy.infer(policy.example_observation(), seed=0)["actions"]
    ref = np.load(os.path.join(ckpt_dir, "reference_actions.npy"))
    maxrss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {
                "load_s": load_s,
                "load_plus_capture_s": ready_s,
                "host_maxrss_gb": maxrss_gb,
                "finite": bool(np.isfinite(out).all()),
                "max_abs_diff_vs_writer": float(np.abs(out - ref).max()),
                "ref_max_abs": float(np.abs(ref).max()),
            }
        )
    )


if __name__ == "__main__":
    {"write": write, "load": load}[sys.argv[1]](sys.argv[2])
