"""Profile one eager Pi0 sample_actions call: top CUDA kernels and memory per phase.

python benchmarks/profile_model.py --preset pi0 --steps 10
"""

import argparse

import torch

from flagscale.models.pi0 import PI0Policy


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="pi0")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-cudnn", action="store_true")
    args = p.parse_args()
    policy = PI0Policy.random(args.preset, device="cuda", dtype="bfloat16")
    if args.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.compile:
        policy.model.compile_passes()
    inputs = policy.preprocess([policy.example_observation()])
    inputs["noise"] = policy.make_noise([None], [0])
    policy.model.sample_actions(**inputs, num_steps=args.steps)
    policy.model.sample_actions(**inputs, num_steps=args.steps)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        policy.model.sample_actions(**inputs, num_steps=args.steps)
        torch.cuda.synchronize()
    print(
        f"peak extra memory per call: {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB"
    )
    print(
        prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90
        )
    )


if __name__ == "__main__":
    main()
