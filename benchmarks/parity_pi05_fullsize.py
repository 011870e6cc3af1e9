"""Full-size Pi0.5 parity with lerobot 0.4.4's PI05 (float32, CPU): random `pi05` weights written
in lerobot's layout, the same inputs and noise through both models, relative L2 of the chunks.
Each step runs in its own process (both models at once would need ~28 GB).

    python benchmarks/parity_pi05_fullsize.py write DIR                # project venv, ~14 GB disk
    python benchmarks/parity_pi05_fullsize.py ours DIR                 # project venv
    /work/lrvenv/bin/python benchmarks/parity_pi05_fullsize.py lerobot DIR   # lerobot venv
    python benchmarks/parity_pi05_fullsize.py compare DIR
"""

import json
import os
import sys
import time

import numpy as np
import torch

STEPS, CAMS, TOKENS, VALID = 10, 3, 200, 137


def write(out_dir):
    from flagscale.models.pi0 import PI0Policy
    from flagscale.models.pi0.weights import save_pretrained

    t0 = time.perf_counter()
    policy = PI0Policy.random("pi05", device="cpu", dtype="float32", seed=0)
    save_pretrained(policy.model, out_dir, layout="lerobot", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    lang_masks = torch.zeros(1, TOKENS, dtype=torch.bool)
    lang_masks[:, :VALID] = True
    inputs = {
        "images": torch.rand(1, CAMS, 3, 224, 224, generator=g) * 2 - 1,
        "img_masks": torch.tensor([[True, True, False]]),
        "lang_tokens": torch.randint(0, 257152, (1, TOKENS), generator=g) * lang_masks,
        "lang_masks": lang_masks,
        "noise": torch.randn(1, 50, 32, generator=g),
    }
    torch.save(inputs, os.path.join(out_dir, "inputs.pt"))
    print(json.dumps({"write_s": round(time.perf_counter() - t0, 1)}))


def ours(ckpt_dir):
    from flagscale.models.pi0 import PI0Policy

    t0 = time.perf_counter()
    policy = PI0Policy.from_pretrained(ckpt_dir, ckpt_dir_tokenizer(ckpt_dir), device="cpu")
    inputs = torch.load(os.path.join(ckpt_dir, "inputs.pt"))
    t1 = time.perf_counter()
    acts = policy.model.sample_actions(**inputs, num_steps=STEPS)
    np.save(os.path.join(ckpt_dir, "ours.npy"), acts.numpy())
    print(json.dumps({"load_s": round(t1 - t0, 1), "sample_s": round(time.perf_counter() - t1, 1)}))


def ckpt_dir_tokenizer(ckpt_dir):
    from flagscale.models.pi0.tokenizer import build_test_tokenizer

    return build_test_tokenizer(os.path.join(ckpt_dir, "tokenizer"))


def lerobot(ckpt_dir):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "models"))
    from lerobot_harness import require_lerobot
    from safetensors import safe_open

    require_lerobot()
    from lerobot.policies.pi05 import modeling_pi05 as lr
    from lerobot.policies.pi05.configuration_pi05 import PI05Config

    t0 = time.perf_counter()
    model = lr.PI05Pytorch(PI05Config(dtype="float32", device="cpu", compile_model=False)).eval()
    params = dict(model.named_parameters(remove_duplicate=False))  # lm_head: embed_tokens, tied
    seen = set()
    with safe_open(os.path.join(ckpt_dir, "model.safetensors"), "pt") as f, torch.no_grad():
        for key in f.keys():  # lerobot's layout: `model.` + PI05Pytorch's names
            name = key.removeprefix("model.")
            params[name].copy_(f.get_tensor(key))
            seen.add(name)
    embed = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    missing = sorted(set(params) - seen - {embed})
    assert not missing, f"not in the checkpoint: {missing[:5]}"
    pg = model.paligemma_with_expert.paligemma
    assert pg.model.language_model.embed_tokens.weight is pg.lm_head.weight  # tied: loaded
    inputs = torch.load(os.path.join(ckpt_dir, "inputs.pt"))
    t1 = time.perf_counter()
    acts = model.sample_actions(
        list(inputs["images"].unbind(1)),
        list(inputs["img_masks"].unbind(1)),
        inputs["lang_tokens"],
        inputs["lang_masks"],
        noise=inputs["noise"],
        num_steps=STEPS,
    )
    np.save(os.path.join(ckpt_dir, "lerobot.npy"), acts.numpy())
    print(json.dumps({"load_s": round(t1 - t0, 1), "sample_s": round(time.perf_counter() - t1, 1)}))


def compare(ckpt_dir):
    a, b = (np.load(os.path.join(ckpt_dir, f)) for f in ("ours.npy", "lerobot.npy"))
    noise = torch.load(os.path.join(ckpt_dir, "inputs.pt"))["noise"].numpy()
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(
        json.dumps(
            {
                "rel_l2": rel,
                "max_abs": float(np.abs(a - b).max()),
                "chunk_rms": float(np.sqrt((b**2).mean())),
                "moved_from_noise": float(np.abs(b - noise).max()),
            }
        )
    )
    return rel


if __name__ == "__main__":
    cmd, path = sys.argv[1], sys.argv[2]
    os.makedirs(path, exist_ok=True)
    {"write": write, "ours": ours, "lerobot": lerobot, "compare": compare}[cmd](path)
