"""Write a small random-weight Pi0 checkpoint, tokenizer and stats.json, to try the real-checkpoint
path (`serve.engine.model` / `tokenizer` / `stat_path`) on a CPU without downloading anything.

    python -m flagscale.tools.make_random_checkpoint /tmp/pi0_tiny
    python run.py --config-path ./examples/pi0/conf --config-name serve action=run \\
        serve.engine.model=/tmp/pi0_tiny serve.engine.tokenizer=/tmp/pi0_tiny/tokenizer \\
        serve.engine.stat_path=/tmp/pi0_tiny/stats.json \\
        serve.engine.device=cpu serve.engine.torch_dtype=float32

Writes `<out>/config.json` + `model.safetensors` (lerobot layout by default; `--max-shard-mb` for
shards), `<out>/tokenizer/` (a small test tokenizer, not PaliGemma's) and `<out>/stats.json`
(lerobot `meta/stats.json` form, `observation.state` and `action`). THE ACTIONS ARE MEANINGLESS.
"""

import argparse
import json
import os
import sys

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write (created)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "pi0"], help="model size")
    p.add_argument("--seed", type=int, default=0, help="random weights and stats seed")
    p.add_argument("--layout", default="lerobot", choices=["lerobot", "openpi"])
    p.add_argument("--max-shard-mb", type=float, default=None, help="write shards of this size")
    p.add_argument("--state-dim", type=int, default=14, help="stats.json state length")
    p.add_argument("--action-dim", type=int, default=14, help="stats.json action length")
    return p.parse_args(argv)


def write_stats(path: str, state_dim: int, action_dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def feature(n):
        return {"mean": rng.normal(0, 0.5, n).tolist(), "std": rng.uniform(0.5, 2.0, n).tolist()}

    with open(path, "w", encoding="utf-8") as f:
        json.dump({"observation.state": feature(state_dim), "action": feature(action_dim)}, f)


def main(argv=None) -> int:
    args = parse_args(argv)
    from flagscale.models.pi0 import PI0Policy
    from flagscale.models.pi0.tokenizer import build_test_tokenizer
    from flagscale.models.pi0.weights import save_pretrained

    policy = PI0Policy.random(args.preset, device="cpu", dtype="float32", seed=args.seed)
    shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    save_pretrained(policy.model, args.out, layout=args.layout, max_shard_bytes=shard)
    build_test_tokenizer(os.path.join(args.out, "tokenizer"))
    write_stats(os.path.join(args.out, "stats.json"), args.state_dim, args.action_dim, args.seed)
    print(f"wrote a random {args.preset} Pi0 checkpoint, tokenizer/ and stats.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
