"""Pi0 latency beside its public peers on the same GPU, each in a process of its own.

    python benchmarks/bench_peers.py --wheels .gpu/whl --out results.json
    python benchmarks/bench_peers.py --model pi05 --peers ours lerobot --wheels .gpu/whl

Peers (random weights, the same shapes for all; p50 of CUDA-event times of one `sample_actions`
call with inputs already on the GPU, after warm-up):
- `ours`: this repo's model as served (fused kernels, one CUDA graph per request shape).
- `flagscale`: `PI0FlowMatching` of the public FlagScale 0.8.0 wheel (`flag-scale==0.8.0`), eager.
- `lerobot`: `PI0Pytorch` (or `PI05Pytorch` with `--model pi05`) of lerobot 0.4.4, eager, on
  transformers 4.53.2 with openpi's `transformers_replace` edits
  (tests/models/lerobot_ref/patch_transformers_openpi.py). PyAV, which lerobot's dataset code
  imports at module level, is an inert stand-in (`av_stub`): the policies never decode video.

A peer's packages live in a target directory of their own (`--peer-root`), filled from the wheels in
`--wheels` at run time (pip, no index): the peer's transformers 4.53.2 never meets this repo's
environment, and the FlagScale wheel's `flagscale` package never meets this repo's. Every worker is
`python bench_peers.py --worker NAME ...` with its own PYTHONPATH; it prints one `RESULT {json}`
line.
"""

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = os.path.join(ROOT, "tests", "models", "lerobot_ref", "patch_transformers_openpi.py")
HF = ["transformers-4.53.2-", "tokenizers-0.21", "huggingface_hub-0."]
# Wheels each peer's target directory gets (file-name prefixes). lerobot's import chain pulls in
# datasets, diffusers (groot), pyserial/deepdiff/cachebox (motors) and draccus (configs).
SITES = {
    "flagscale": HF + ["omegaconf-", "antlr4_python3_runtime-"],
    "lerobot": HF
    + ["lerobot-0.4.4-", "datasets-", "dill-", "multiprocess-", "diffusers-", "pyserial-"]
    + ["deepdiff-", "orderly_set-", "cachebox-", "importlib_metadata-", "draccus-", "mergedeep-"]
    + ["pyyaml_include-", "toml-"],
}
FLAGSCALE_WHEEL = "flag_scale-0.8.0-"
MODELS = {"pi0": ("ours", "flagscale", "lerobot"), "pi05": ("ours", "lerobot")}
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_LLM = (64, 2, 128, 4, 1, 16)  # width, depth, mlp, heads, kv heads, head dim
TINY_EXPERT = (32, 2, 64, 4, 1, 16)


# ---------------------------------------------------------------- shared by every worker


def load_timing():
    """flagscale/engine/timing.py by path: a peer's `flagscale` (FlagScale's) must not shadow it."""
    spec = importlib.util.spec_from_file_location(
        "_bench_timing", os.path.join(ROOT, "flagscale", "engine", "timing.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_calls(fn, args):
    """p50 etc. of `args.iters` calls after `args.warmup`: CUDA events on a GPU, host clock else."""
    timing = load_timing()
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()  # the peak of the timed calls, not of the build
        return timing.percentiles(timing.cuda_times(fn, args.iters, args.warmup))
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return timing.percentiles(times)


def peer_inputs(args, dtype_images):
    """Random inputs of the shapes every peer takes (seeded; values do not change the timing)."""
    import torch

    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.image_size
    images = torch.rand(b, args.cameras, 3, s, s, generator=g) * 2 - 1
    lang = torch.randint(1, 256000, (b, args.tokens), generator=g)
    lang_masks = torch.zeros(b, args.tokens, dtype=torch.bool)
    lang_masks[:, : max(1, args.tokens // 3)] = True
    dev = args.device
    return dict(
        images=[im.to(dev, dtype_images) for im in images.unbind(1)],
        img_masks=[torch.ones(b, dtype=torch.bool, device=dev) for _ in range(args.cameras)],
        lang_tokens=(lang * lang_masks).to(dev),
        lang_masks=lang_masks.to(dev),
        state=torch.randn(b, 32, generator=g).to(dev),
        noise=torch.randn(b, 50, 32, generator=g).to(dev),
    )


def peak_gb():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ---------------------------------------------------------------- workers


def worker_ours(args):
    import torch

    sys.path.insert(0, ROOT)
    from flagscale.models.pi0 import PI0Policy

    preset = {"pi0": "pi0", "pi05": "pi05"}[args.model] + ("_tiny" if args.tiny else "")
    preset = "tiny" if preset == "pi0_tiny" else preset
    policy = PI0Policy.random(preset, device=args.device, dtype=args.dtype)
    obs = [policy.example_observation(n_cameras=args.cameras, seed=i) for i in range(args.batch)]
    inputs = policy.preprocess(obs)
    inputs["noise"] = policy.make_noise([None] * args.batch, list(range(args.batch)))
    if args.device == "cuda":
        policy.enable_cuda_graphs([args.batch])
    else:
        policy.sampler = policy.model.sample_actions
    with torch.inference_mode():
        stats = time_calls(lambda: policy.sampler(**inputs, num_steps=args.steps), args)
    return dict(stats=stats, tokens=int(inputs["lang_tokens"].shape[1]), variant=preset)


def _flagscale_config(args):
    from flagscale.models.pi0 import modeling_pi0 as fs

    if args.tiny:  # shrink the hard-coded PaliGemma / Gemma-300M sizes (dimensions only)
        real = fs.PaliGemmaWithExpertConfig

        def small(**kw):
            cfg = real(**kw)
            _shrink_hf_paligemma(cfg.paligemma_config, args.image_size)
            _shrink_hf_gemma(cfg.gemma_expert_config, TINY_EXPERT)
            return cfg

        fs.PaliGemmaWithExpertConfig = small
    return fs.PI0PolicyConfig(
        freeze_vision_encoder=True,
        train_expert_only=True,
        train_state_proj=True,
        attention_implementation="eager",
        max_state_dim=32,
        max_action_dim=32,
        proj_width=TINY_EXPERT[0] if args.tiny else 1024,
        n_action_steps=50,
        num_steps=args.steps,
        use_cache=True,
    )


def _shrink_hf_gemma(cfg, dims):
    width, depth, mlp, heads, kv, head_dim = dims
    cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size = width, depth, mlp
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = heads, kv, head_dim


def _shrink_hf_paligemma(cfg, image_size):
    for key, value in TINY_VISION.items():
        setattr(cfg.vision_config, key, value)
    cfg.vision_config.image_size = image_size
    cfg.vision_config.projection_dim = cfg.projection_dim = cfg.hidden_size = TINY_LLM[0]
    _shrink_hf_gemma(cfg.text_config, TINY_LLM)


def worker_flagscale(args):
    import torch

    from flagscale.models.pi0 import modeling_pi0 as fs

    config = _flagscale_config(args)
    with torch.device(args.device):
        model = fs.PI0FlowMatching(config).eval()
    x = peer_inputs(args, torch.float32)
    with torch.no_grad():
        stats = time_calls(lambda: model.sample_actions(**x), args)
    return dict(stats=stats, module=fs.__file__, transformers=_version("transformers"))


def _lerobot_tiny(mod):
    """Shrink lerobot's hard-coded tower sizes, as tests/models/test_lerobot_parity.py does."""
    gemma = {"gemma_2b": mod.GemmaConfig(*TINY_LLM), "gemma_300m": mod.GemmaConfig(*TINY_EXPERT)}
    real = mod.PaliGemmaForConditionalGeneration

    def small(config):
        _shrink_hf_paligemma(config, config.vision_config.image_size)
        return real(config=config)

    mod.get_gemma_config = gemma.__getitem__
    mod.PaliGemmaForConditionalGeneration = small


def worker_lerobot(args):
    import torch

    if args.model == "pi05":
        from lerobot.policies.pi05 import modeling_pi05 as mod
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as Config
    else:
        from lerobot.policies.pi0 import modeling_pi0 as mod
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as Config
    if args.tiny:
        _lerobot_tiny(mod)
    s = args.image_size
    cfg = Config(dtype=args.dtype, image_resolution=(s, s), compile_model=False, device=args.device)
    with torch.device(args.device):
        model = (mod.PI05Pytorch if args.model == "pi05" else mod.PI0Pytorch)(cfg).eval()
    x = peer_inputs(args, torch.float32)
    if args.model == "pi05":  # the state is in the prompt (discretised), not an input
        x.pop("state")
        x["tokens"], x["masks"] = x.pop("lang_tokens"), x.pop("lang_masks")
    with torch.no_grad():
        stats = time_calls(lambda: model.sample_actions(**x, num_steps=args.steps), args)
    return dict(stats=stats, module=mod.__file__, transformers=_version("transformers"))


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


WORKERS = {"ours": worker_ours, "flagscale": worker_flagscale, "lerobot": worker_lerobot}


def run_worker(args):
    import torch

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    result = WORKERS[args.worker](args)
    result.update(
        peer=args.worker,
        peak_gb=peak_gb(),
        total_s=time.perf_counter() - t0,
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    )
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- orchestration


def install_site(peer, wheels, peer_root, python):
    """pip-install a peer's wheels into its own target directory (no index); returns PYTHONPATH."""
    site = os.path.join(peer_root, peer)
    paths = [site]
    if os.path.isdir(site):
        return _with_flagscale(peer, wheels, peer_root, paths)
    files = []
    for prefix in SITES[peer]:
        found = sorted(glob.glob(os.path.join(wheels, prefix + "*.whl")))
        if not found:
            raise SystemExit(f"{peer}: no wheel {prefix}*.whl in {wheels}")
        files.append(found[-1])
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    subprocess.run(pip + ["--target", site] + files, check=True)
    if peer == "lerobot":  # openpi's transformers_replace edits, in this target only
        subprocess.run([python, PATCH], check=True, env=dict(os.environ, PYTHONPATH=site))
    return _with_flagscale(peer, wheels, peer_root, paths)


AV_STUB = '''"""Stand-in for PyAV (a 36 MB wheel): lerobot.datasets.video_utils imports it at
module level, lerobot's policies never decode video. Any other use fails loudly."""
import types

logging = types.SimpleNamespace(WARNING=24)  # FFmpeg's AV_LOG_WARNING: a default argument


def __getattr__(name):
    raise ImportError(f"av.{name}: PyAV is a stand-in in this benchmark (bench_peers.py)")
'''


def av_stub(peer_root):
    """A folder holding the `av` stand-in (first on lerobot's PYTHONPATH)."""
    folder = os.path.join(peer_root, "stubs")
    os.makedirs(os.path.join(folder, "av"), exist_ok=True)
    with open(os.path.join(folder, "av", "__init__.py"), "w") as f:
        f.write(AV_STUB)
    return folder


def _with_flagscale(peer, wheels, peer_root, paths):
    """FlagScale's wheel holds its code as flag_scale/flagscale/...: extract that folder only."""
    if peer != "flagscale":
        return os.pathsep.join(paths)
    dest = os.path.join(peer_root, "flag_scale_0.8.0")
    wheel = sorted(glob.glob(os.path.join(wheels, FLAGSCALE_WHEEL + "*.whl")))
    if not wheel:
        raise SystemExit(f"flagscale: no wheel {FLAGSCALE_WHEEL}*.whl in {wheels}")
    with zipfile.ZipFile(wheel[-1]) as z:
        names = [n for n in z.namelist() if n.startswith("flag_scale/flagscale/")]
        z.extractall(dest, names)
    return os.pathsep.join([os.path.join(dest, "flag_scale")] + paths)


def worker_command(args, peer, python):
    cmd = [python, os.path.abspath(__file__), "--worker", peer, "--model", args.model]
    flags = (
        "batch",
        "cameras",
        "steps",
        "iters",
        "warmup",
        "image_size",
        "tokens",
        "device",
        "dtype",
    )
    for flag in flags:
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return cmd + (["--tiny"] if args.tiny else [])


def run_peer(args, peer):
    """One worker process; returns its RESULT (or the error it died with)."""
    python = args.python if peer == "ours" else (args.peer_python or args.python)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="0")
    if peer == "ours":
        env["PYTHONPATH"] = ROOT
    else:  # without --wheels, the peer's packages are already in `--peer-python`'s environment
        site = install_site(peer, args.wheels, args.peer_root, python) if args.wheels else ""
        stub = av_stub(args.peer_root) if peer == "lerobot" else ""
        env["PYTHONPATH"] = os.pathsep.join(p for p in (stub, site, *args.peer_path) if p)
    proc = subprocess.run(
        worker_command(args, peer, python),
        env=env,
        capture_output=True,
        text=True,
        timeout=args.timeout,
        cwd="/",
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"peer": peer, "error": f"exit {proc.returncode}", "log_tail": tail}


def table(results, model):
    """Markdown table: each peer's p50 and our speed-up over it (peer p50 / our p50)."""
    ours = next((r for r in results if r.get("peer") == "ours" and "stats" in r), None)
    rows = [
        f"| {model} peer | p50 ms | p90 ms | peak GPU GB | our speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "stats" not in r:
            rows.append(f"| {r['peer']} | failed: {r.get('error')} | | | |")
            continue
        s = r["stats"]
        ratio = f"{s['p50'] / ours['stats']['p50']:.1f}x" if ours else "-"
        gb = f"{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else "-"
        rows.append(f"| {r['peer']} | {s['p50']:.2f} | {s['p90']:.2f} | {gb} | {ratio} |")
    return "\n".join(rows)


def orchestrate(args):
    peers = args.peers or list(MODELS[args.model])
    unknown = [p for p in peers if p not in MODELS[args.model]]
    if unknown:
        raise SystemExit(f"--peers: {unknown} not available for --model {args.model}")
    if args.peer_root:
        os.makedirs(args.peer_root, exist_ok=True)
    results = []
    for peer in peers:
        t0 = time.perf_counter()
        result = run_peer(args, peer)
        if peer == "ours" and "tokens" in result:
            args.tokens = result["tokens"]  # the peers get the prompt length ours used
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)
        print(json.dumps(result), flush=True)
    print(table(results, args.model), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="pi0", choices=sorted(MODELS))
    p.add_argument("--peers", nargs="+", default=None, help="default: every peer of --model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cameras", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--tokens", type=int, default=48, help="peers' prompt length (ours sets it)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="ours and lerobot (FlagScale's code always runs its towers in bf16)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny towers (CPU plumbing tests)")
    p.add_argument("--wheels", default=None, help="folder of the peers' wheels")
    p.add_argument("--peer-root", default="/tmp/bench_peers", help="peers' target directories")
    p.add_argument("--python", default=sys.executable, help="interpreter for ours")
    p.add_argument("--peer-python", default=None, help="interpreter for the peers")
    p.add_argument("--peer-path", nargs="*", default=[], help="extra PYTHONPATH for the peers")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, choices=sorted(WORKERS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
