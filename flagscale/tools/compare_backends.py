"""Compare op backends on the same Pi0 inputs and fixed noise: FlagGems vs native vs fp32 reference.

    # full-size random weights (no checkpoint needed), 3 cameras, 10 steps, B=1
    python -m flagscale.tools.compare_backends --preset pi0 --random
    # a real checkpoint
    python -m flagscale.tools.compare_backends --model /models/lerobot/pi0 \\
        --tokenizer /models/google/paligemma-3b-pt-224
    # two running servers (baseline first), same v1 body and seed; an optional third: the reference
    python -m flagscale.tools.compare_backends --urls http://a:9010 http://b:9011

Each backend runs in its own process (this module re-runs itself with --child), so FlagGems is never
imported into the native run. Runs: native (--dtype, default bfloat16), the candidate (default
flaggems, same dtype) and a float32 native reference whose weights are the bf16-rounded ones
(--reference-weights rounded: the reference isolates arithmetic error; `exact` keeps the unrounded
weights). Printed: MAPE, median APE, max abs error, relative L2 and cosine similarity of the
candidate vs native, and of each vs the reference, plus the targets (rel L2 <= 1 %, MAPE < 1.4152 %,
candidate error vs reference <= 1.5x native's; with --latency, candidate model time <= 1.25x
native's, graphed if --graphs). Exit code 1 if a target fails (--no-fail: always 0).

MAPE = mean(|a - b| / |b|) over elements: an element whose baseline value is near zero turns a tiny
absolute difference into a huge percentage, so MAPE grows with the share of near-zero outputs
(random weights give many). Relative L2 and cosine do not; "MAPE |b| >= 10% rms" drops those
elements.

--latency N also times the model call (CUDA events, median of N after 3 warm-ups; eager, and with
--graphs under whole-request CUDA graphs). --warm-restart runs the candidate a second time in a
fresh process on the same cache (cold vs warm first call; --cold-cache starts from an empty cache).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from pathlib import Path

import numpy as np

from flagscale.ops import FLAGGEMS_ENV

MAPE_TARGET = 1.4152  # %, FlagRelease's reported FlagGems-vs-native MAPE for Pi0
REL_L2_TARGET = 1.0  # %
REF_RATIO_TARGET = 1.5
LATENCY_RATIO_TARGET = 1.25  # candidate / native model time, same run (#5: FlagGems <= 1.25x)


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------


def error_metrics(test, base) -> dict:
    """Errors of `test` relative to `base` (same shape). Percentages are in %."""
    a = np.asarray(test, np.float64).ravel()
    b = np.asarray(base, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {np.shape(test)} vs {np.shape(base)}")
    diff = np.abs(a - b)
    nonzero = b != 0
    ape = diff[nonzero] / np.abs(b[nonzero])
    rms = float(np.sqrt(np.mean(b * b))) if b.size else 0.0
    big = np.abs(b) >= 0.1 * rms
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return {
        "mape": float(ape.mean() * 100) if ape.size else float("nan"),
        "median_ape": float(np.median(ape) * 100) if ape.size else float("nan"),
        "mape_big": float((diff[big] / np.abs(b[big])).mean() * 100) if big.any() else float("nan"),
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30) * 100),
        "cosine": float(np.dot(a, b) / denom) if denom > 0 else float("nan"),
        "near_zero_share": float(np.mean(np.abs(b) < 0.01 * rms)) if b.size else 0.0,
        "finite": bool(np.isfinite(a).all()),
    }


def check_targets(cand_vs_base, base_vs_ref=None, cand_vs_ref=None) -> list:
    """[(name, value, limit, ok)] for the issue's accuracy targets."""
    rel, mape = cand_vs_base["rel_l2"], cand_vs_base["mape"]
    rows = [
        ("finite", cand_vs_base["finite"], True, cand_vs_base["finite"]),
        ("rel_l2 % vs native", rel, REL_L2_TARGET, rel <= REL_L2_TARGET),
        ("MAPE % vs native", mape, MAPE_TARGET, mape < MAPE_TARGET),
    ]
    if base_vs_ref and cand_vs_ref:
        ratio = cand_vs_ref["rel_l2"] / max(base_vs_ref["rel_l2"], 1e-30)
        rows.append(("rel_l2 vs fp32 ref, candidate/native", ratio, REF_RATIO_TARGET, ratio <= 1.5))
    return rows


def latency_target(native_meta, cand_meta) -> list:
    """[(name, ratio, limit, ok)] for candidate / native median model time, under CUDA graphs
    when both runs have them (else eager); [] when the runs were not timed (no --latency)."""
    times = [(meta or {}).get("latency") or {} for meta in (native_meta, cand_meta)]
    for mode in ("graphs", "eager"):
        medians = [t.get(mode, {}).get("median_ms") for t in times]
        if all(medians):
            ratio = medians[1] / medians[0]
            name = f"latency candidate/native ({mode}, {medians[1]:.2f} / {medians[0]:.2f} ms)"
            return [(name, ratio, LATENCY_RATIO_TARGET, ratio <= LATENCY_RATIO_TARGET)]
    return []


# ------------------------------------------------------------------------------------------------
# child: one backend in this process
# ------------------------------------------------------------------------------------------------


def build_policy(args):
    from flagscale.models.pi0 import PI0Policy
    from flagscale.ops import build_ops

    routes = parse_routes(args.routes)
    ops = build_ops(args.backend, routes=routes) if routes else args.backend
    kw = dict(device=args.device, dtype=args.dtype, ops=ops, fused_kernels=args.fused_kernels)
    kw["precision"] = args.precision
    if args.model:
        policy = PI0Policy.from_pretrained(args.model, args.tokenizer, preset=args.preset, **kw)
    else:
        policy = PI0Policy.random(preset=args.preset, seed=args.weight_seed, **kw)
    return policy


def parse_routes(items) -> dict:
    """["linear=native", ...] -> {"linear": "native", ...}."""
    out = {}
    for item in items or []:
        name, sep, route = item.partition("=")
        if not sep:
            raise SystemExit(f"--routes expects OP=ROUTE, got {item!r}")
        out[name.strip()] = route.strip()
    return out


def round_weights(model, dtype_name: str) -> int:
    """Round the weights a `dtype_name` model would hold in that dtype (fp32-kept ones stay)."""
    from flagscale.models.pi0.policy import DTYPES
    from flagscale.models.pi0.weights import keeps_fp32

    dtype = DTYPES[dtype_name.replace("torch.", "").lower()]
    n = 0
    for name, param in model.named_parameters():
        if not keeps_fp32(name):
            param.data = param.data.to(dtype).to(param.dtype)
            n += 1
    return n


def fixed_inputs(policy, args):
    obs = policy.example_observation(n_cameras=args.cameras, seed=args.input_seed)
    if args.prompt:
        obs["prompt"] = args.prompt
    c = policy.config
    rng = np.random.default_rng(args.noise_seed)
    noise = rng.standard_normal((c.chunk_size, c.max_action_dim)).astype(np.float32)
    return obs, noise


def timed(fn):
    import torch

    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def cuda_latency(fn, iters: int, warmup: int = 3) -> dict:
    from flagscale.engine.timing import cuda_times, percentiles

    stats = percentiles(cuda_times(fn, iters, warmup))
    return {"median_ms": stats["p50"], "min_ms": stats["min"], "p90_ms": stats["p90"], "n": iters}


def measure_latency(policy, obs, noise, args) -> dict:
    import torch

    inputs = policy.preprocess([obs])
    inputs["noise"] = torch.as_tensor(noise[None], device=policy.model.device)
    steps = args.steps
    out = {"eager": cuda_latency(lambda: policy.sampler(**inputs, num_steps=steps), args.latency)}
    eager = policy.sampler(**inputs, num_steps=steps)
    if args.graphs:
        try:
            _, capture_s = timed(lambda: policy.enable_cuda_graphs([1])(**inputs, num_steps=steps))
            graphed = policy.sampler(**inputs, num_steps=steps)
            out["graphs"] = cuda_latency(
                lambda: policy.sampler(**inputs, num_steps=steps), args.latency
            )
            out["graphs"]["capture_s"] = capture_s
            out["graphs"]["max_abs_vs_eager"] = float((graphed - eager).abs().max())
        except Exception as e:  # report, do not hide: capture failures are a result too
            out["graphs"] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            policy.sampler = policy.model.sample_actions
    return out


def run_child(args) -> dict:
    import torch

    if args.backend == "flaggems" and args.cache_dir:
        from flagscale.ops.flaggems import configure_cache

        configure_cache(args.cache_dir)
    policy, build_s = timed(lambda: build_policy(args))
    if args.round_weights:
        round_weights(policy.model, args.round_weights)
    obs, noise = fixed_inputs(policy, args)
    infer = lambda: policy.infer(obs, num_steps=args.steps, noise=noise)["actions"]  # noqa: E731
    first, first_s = timed(infer)
    second, second_s = timed(infer)
    meta = {
        "backend": args.backend,
        "dtype": args.dtype,
        "precision": args.precision,
        "routes": dict(policy.model.ops.routes),
        "build_s": build_s,
        "first_call_s": first_s,
        "second_call_s": second_s,
        "repeat_max_abs": float(np.abs(first - second).max()),
        "versions": versions(),
    }
    if args.latency and torch.cuda.is_available():
        meta["latency"] = measure_latency(policy, obs, noise, args)
    np.save(args.save, second)
    Path(args.save).with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


def versions() -> dict:
    import torch

    out = {"torch": torch.__version__}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    for name in ("triton", "flag_gems"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


# ------------------------------------------------------------------------------------------------
# parent: spawn the runs, compare
# ------------------------------------------------------------------------------------------------

CHILD_FLAGS = (
    "preset", "model", "tokenizer", "device", "steps", "cameras", "prompt", "weight_seed",
    "input_seed", "noise_seed", "latency", "fused_kernels",
)  # fmt: skip


def child_command(
    args, backend, dtype, save, round_to=None, cache_dir=None, latency=True, routes=None,
    precision="bf16",
):  # fmt: skip
    cmd = [sys.executable, "-m", "flagscale.tools.compare_backends", "--child"]
    cmd += ["--backend", backend, "--dtype", dtype, "--save", str(save), "--precision", precision]
    for name in CHILD_FLAGS:
        value = getattr(args, name)
        if name == "latency" and not latency:
            value = 0
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    if args.random:
        cmd.append("--random")
    if args.graphs and latency:
        cmd.append("--graphs")
    if round_to:
        cmd += ["--round-weights", round_to]
    if cache_dir:
        cmd += ["--cache-dir", str(cache_dir)]
    if routes:
        cmd += ["--routes", *routes]
    return cmd


def spawn(label, cmd, env, timeout):
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"[{label}] did not finish within --timeout {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise SystemExit(f"[{label}] failed with exit code {proc.returncode}")
    print(f"[{label}] done in {time.perf_counter() - start:.1f} s", flush=True)


def plan_runs(args, out: Path):
    """[(label, command, extra env)] in run order."""
    env_fg, cache = cold_cache_env(args) if args.cold_cache else ({}, args.cache_dir)
    cand = dict(cache_dir=cache, routes=args.routes, precision=args.candidate_precision)
    runs = [("native", child_command(args, "native", args.dtype, out / "native.npy"), {})]
    save = out / "candidate.npy"
    latency = not args.warm_restart  # time the warm process only
    cmd = child_command(args, args.candidate, args.dtype, save, latency=latency, **cand)
    runs.append((args.candidate, cmd, env_fg))
    if args.warm_restart:
        cmd = child_command(args, args.candidate, args.dtype, out / "candidate_warm.npy", **cand)
        runs.append((f"{args.candidate} (warm restart)", cmd, env_fg))
    if not args.no_reference:
        round_to = args.dtype if args.reference_weights == "rounded" else None
        save = out / "reference.npy"
        cmd = child_command(args, "native", "float32", save, round_to, latency=False)
        runs.append(("fp32 reference", cmd, {}))
    return runs


def cold_cache_env(args):
    """An empty FlagGems + Triton cache for the candidate (a given --cache-dir must be empty)."""
    cache = args.cache_dir
    if cache and Path(cache).is_dir() and any(Path(cache).iterdir()):
        raise SystemExit(f"--cold-cache: {cache} is not empty; give an empty or new directory")
    cache = cache or tempfile.mkdtemp(prefix="flaggems-cold-")
    env = {"FLAGGEMS_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(Path(cache) / "triton")}
    return env, cache


def load_run(out: Path, name: str):
    path = out / f"{name}.npy"
    if not path.exists():
        return None, None
    meta = (
        json.loads(path.with_suffix(".json").read_text())
        if path.with_suffix(".json").exists()
        else {}
    )
    return np.load(path), meta


def compare_local(args) -> dict:
    out = Path(args.out or tempfile.mkdtemp(prefix="compare-backends-"))
    out.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ, PYTHONUNBUFFERED="1")
    base_env.pop(FLAGGEMS_ENV, None)  # every child names its backend explicitly
    for label, cmd, env in plan_runs(args, out):
        spawn(label, cmd, dict(base_env, **env), args.timeout)
    runs = {
        name: load_run(out, name) for name in ("native", "candidate", "candidate_warm", "reference")
    }
    report = summarize(runs, args.candidate)
    report["out_dir"] = str(out)
    return report


def summarize(runs: dict, candidate: str) -> dict:
    (native, native_meta), (cand, cand_meta) = runs["native"], runs["candidate"]
    ref = runs.get("reference", (None, None))[0]
    report = {"candidate": candidate, "shape": list(native.shape)}
    report["candidate_vs_native"] = error_metrics(cand, native)
    if ref is not None:
        report["native_vs_reference"] = error_metrics(native, ref)
        report["candidate_vs_reference"] = error_metrics(cand, ref)
    warm, warm_meta = runs.get("candidate_warm", (None, None))
    if warm is not None:
        report["candidate_restart_max_abs"] = float(np.abs(warm - cand).max())
    report["targets"] = check_targets(
        report["candidate_vs_native"],
        report.get("native_vs_reference"),
        report.get("candidate_vs_reference"),
    ) + latency_target(native_meta, cand_meta)
    report["runs"] = {"native": native_meta, "candidate": cand_meta, "candidate_warm": warm_meta}
    return report


# ------------------------------------------------------------------------------------------------
# servers
# ------------------------------------------------------------------------------------------------


def server_body(info: dict, args) -> dict:
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(args.input_seed)
    cameras = list((info.get("cameras") or {}).keys()) or [
        "cam_high",
        "cam_left_wrist",
        "cam_right_wrist",
    ]
    images = {}
    for name in cameras[: args.cameras]:
        buf = io.BytesIO()  # PNG: lossless, both servers decode identical pixels
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, format="PNG")
        images[name] = base64.b64encode(buf.getvalue()).decode("ascii")
    state = rng.standard_normal(int(info.get("state_dim") or 14)).round(4).tolist()
    return {
        "instruction": args.prompt or "pick up the cube",
        "images": [images],
        "eef_pose": [state],
        "state": [state],
        "num_steps": args.steps,
        "seed": args.noise_seed,
    }


def query_server(url: str, body: dict, timeout: float):
    import requests

    url = url.rstrip("/")
    try:
        info = requests.get(f"{url}/info", timeout=timeout).json()
    except Exception:
        info = {}
    resp = requests.post(f"{url}/infer", json=body, timeout=timeout)
    data = resp.json()
    if resp.status_code != 200 or not data.get("success", True):
        raise SystemExit(f"{url}/infer answered {resp.status_code}: {data.get('error', data)}")
    return np.asarray(data["actions"], np.float32), info


def compare_servers(args) -> dict:
    import requests

    try:
        info = requests.get(args.urls[0].rstrip("/") + "/info", timeout=args.timeout).json()
    except Exception as e:
        raise SystemExit(f"cannot reach {args.urls[0]}/info: {e}") from None
    body = server_body(info, args)
    results = [query_server(url, body, args.timeout) for url in args.urls]
    runs = {"native": (results[0][0], {"url": args.urls[0], "ops": results[0][1].get("ops")})}
    runs["candidate"] = (results[1][0], {"url": args.urls[1], "ops": results[1][1].get("ops")})
    if len(results) > 2:
        runs["reference"] = (results[2][0], {"url": args.urls[2]})
    return summarize(runs, args.urls[1])


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------

METRIC_ROWS = (
    ("mape", "MAPE %"),
    ("median_ape", "median APE %"),
    ("mape_big", "MAPE % (|b| >= 10% rms)"),
    ("max_abs", "max abs error"),
    ("rel_l2", "relative L2 %"),
    ("cosine", "cosine similarity"),
    ("near_zero_share", "share |b| < 1% rms"),
)


def format_report(report: dict) -> str:
    cols = [
        k
        for k in ("candidate_vs_native", "native_vs_reference", "candidate_vs_reference")
        if k in report
    ]
    lines = [f"actions {report['shape']}; a vs b:"]
    lines.append(f"{'':28}" + "".join(f"{c:>26}" for c in cols))
    for key, label in METRIC_ROWS:
        lines.append(f"{label:28}" + "".join(f"{report[c][key]:>26.6g}" for c in cols))
    if "candidate_restart_max_abs" in report:
        lines.append(
            "candidate run-to-run (separate processes) max abs: "
            f"{report['candidate_restart_max_abs']:.3g}"
        )
    for name, meta in (report.get("runs") or {}).items():
        if meta:
            lines.append(
                f"{name}: " + json.dumps({k: v for k, v in meta.items() if k != "versions"})
            )
    lines.append("targets:")
    for name, value, limit, ok in report["targets"]:
        lines.append(f"  {'PASS' if ok else 'FAIL'} {name}: {value:.4g} (limit {limit})")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_model_args(p.add_argument_group("model"))
    run = p.add_argument_group("run")
    run.add_argument("--device", default="cuda")
    run.add_argument("--dtype", default="bfloat16", help="dtype of the native and candidate runs")
    run.add_argument("--candidate", default="flaggems", help="backend compared with native")
    run.add_argument(
        "--candidate-precision",
        choices=("bf16", "fp8"),
        default="bf16",
        help="engine.precision of the candidate (fp8: e4m3 prefix GEMMs; with --candidate native)",
    )
    run.add_argument("--steps", type=int, default=10)
    run.add_argument("--cameras", type=int, default=3)
    run.add_argument("--prompt", default=None)
    run.add_argument("--weight-seed", type=int, default=0)
    run.add_argument("--input-seed", type=int, default=0)
    run.add_argument("--noise-seed", type=int, default=0)
    run.add_argument("--reference-weights", choices=("rounded", "exact"), default="rounded")
    run.add_argument("--no-reference", action="store_true", help="skip the fp32 reference run")
    run.add_argument(
        "--routes", nargs="+", metavar="OP=ROUTE", help="candidate per-op overrides: linear=native"
    )
    run.add_argument("--cache-dir", help="FLAGGEMS_CACHE_DIR for the candidate runs")
    run.add_argument(
        "--cold-cache", action="store_true", help="start the candidate from an empty cache"
    )
    run.add_argument(
        "--warm-restart", action="store_true", help="re-run the candidate in a new process"
    )
    run.add_argument("--latency", type=int, default=0, help="time N model calls per backend")
    run.add_argument("--graphs", action="store_true", help="with --latency: also under CUDA graphs")
    run.add_argument(
        "--fused-kernels",
        choices=("off", "auto", "on"),
        default="off",
        help="fused Triton expert kernels: off (both backends: composed ops), auto (native only) "
        "or on (both: the expert's short inputs on the fused kernels, the rest on each backend)",
    )
    _add_output_args(run)
    _add_child_args(p.add_argument_group("internal (one backend per process)"))
    args = p.parse_args(argv)
    if not (args.child or args.urls or args.random or args.model):
        p.error("give --random (with --preset), --model DIR, or --urls")
    return args


def _add_model_args(src):
    src.add_argument(
        "--preset",
        default="pi0",
        help="dimensions preset for --random (pi0 | tiny | pi05 | pi05_tiny)",
    )
    src.add_argument("--random", action="store_true", help="random weights (no checkpoint)")
    src.add_argument("--model", help="checkpoint directory")
    src.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    src.add_argument("--urls", nargs="+", help="running servers: baseline, candidate[, reference]")


def _add_child_args(child):
    child.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    child.add_argument("--backend", default="native", help=argparse.SUPPRESS)
    child.add_argument("--save", help=argparse.SUPPRESS)
    child.add_argument("--round-weights", help=argparse.SUPPRESS)
    child.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)


def _add_output_args(run):
    run.add_argument("--timeout", type=float, default=1800, help="seconds per run / request")
    run.add_argument("--out", help="directory for the .npy/.json results (default: a temp dir)")
    run.add_argument("--json", help="also write the report here")
    run.add_argument("--no-fail", action="store_true", help="exit 0 even if a target fails")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    report = compare_servers(args) if args.urls else compare_local(args)
    print(format_report(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    failed = [row for row in report["targets"] if not row[3]]
    return 0 if args.no_fail or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
