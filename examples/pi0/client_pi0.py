"""Client for the FlagScale Pi0 server (POST /infer, FlagScale v1 body).

    python examples/pi0/client_pi0.py --host 127.0.0.1 --port 9010 \\
        --base-img examples/pi0/orbbec_0_latest.jpg \\
        --left-wrist-img examples/pi0/orbbec_1_latest.jpg \\
        --right-wrist-img examples/pi0/orbbec_2_latest.jpg --num-steps 20

FlagScale's current client flags work too (`--img1 --img2 --img3` for the three cameras,
`--state-path` a `.pt` tensor or `.npy` array of shape (state_dim,) or (1, state_dim),
`--instruction`); only the default port differs (9010 here, 5000 in FlagScale's Pi0.5 examples).

Sends the JPEG files as base64 under the model's image names (`observation.images.base_0_rgb`,
`..left_wrist_0_rgb`, `..right_wrist_0_rgb`, which every server config accepts), the state as
`eef_pose` (the model's state in v1), `state` and `qpos`. A missing image file is an error; to
send a camera masked, say so with `--mask <camera>`. Prints the action shape, a few values, server
timing and round-trip latency. With `--rtc-delay D --repeat N`, every request after the first asks
for real-time chunking (`rtc`): it sends the previous chunk's actions after the first
`--rtc-executed` (the leftover) and inference_delay D, and prints how close the first D new actions
are to the leftover. Exit codes: 0 ok, 1 the server answered an error, 2 bad arguments, 3 server
unreachable, 4 timeout. Needs only numpy and the standard library (and torch to read a .pt state
file).
"""

import argparse
import base64
import json
import socket
import sys
import time
import urllib.error
import urllib.request

from pathlib import Path

import numpy as np

DEFAULT_INSTRUCTION = "Grab the orange and put it into the basket."
IMAGE_PREFIX = "observation.images."
CAMERAS = (
    ("cam_high", "base_img", "base_0_rgb"),
    ("cam_left_wrist", "left_wrist_img", "left_wrist_0_rgb"),
    ("cam_right_wrist", "right_wrist_img", "right_wrist_0_rgb"),
)


class ClientError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Client for the FlagScale Pi0 inference server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9010)
    p.add_argument("--base-img", "--img1", help="JPEG/PNG for cam_high (base_0_rgb)")
    p.add_argument(
        "--left-wrist-img", "--img2", help="JPEG/PNG for cam_left_wrist (left_wrist_0_rgb)"
    )
    p.add_argument(
        "--right-wrist-img", "--img3", help="JPEG/PNG for cam_right_wrist (right_wrist_0_rgb)"
    )
    p.add_argument("--num-steps", type=int, default=10, help="flow-matching steps (default 10)")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="task prompt")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--state", default=None, help="comma-separated robot state (default zeros)")
    state.add_argument(
        "--state-path", default=None, help="robot state from a .pt (torch tensor) or .npy file"
    )
    p.add_argument(
        "--state-dim", type=int, default=14, help="length of the zero state (default 14)"
    )
    p.add_argument("--seed", type=int, default=None, help="noise seed (reproducible actions)")
    p.add_argument("--output", default=None, help="save actions to .npy, or the response to .json")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--repeat", type=int, default=1, help="send the request N times, print latency")
    p.add_argument("--health", action="store_true", help="only query GET /health and exit")
    p.add_argument(
        "--rtc-delay",
        type=int,
        default=None,
        help="real-time chunking: send each previous chunk's leftover with this inference_delay",
    )
    p.add_argument(
        "--rtc-executed",
        type=int,
        default=10,
        help="with --rtc-delay: actions of the previous chunk taken as executed (default 10)",
    )
    p.add_argument(
        "--mask",
        action="append",
        default=[],
        choices=[camera for camera, _, _ in CAMERAS],
        help="send this camera masked, without an image (repeatable)",
    )
    # FlagScale v1 leftovers: accepted and sent as v1 did; the server ignores them
    v1 = "FlagScale v1 field, sent as v1 did; the Pi0 server ignores it"
    p.add_argument("--temperature", type=float, default=0.8, help=f"{v1} (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help=f"{v1} (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=64, help=f"{v1} (default 64)")
    p.add_argument("--do-sample", action="store_true", help=v1)
    p.add_argument("--high-level-instruction", default=DEFAULT_INSTRUCTION, help=v1)
    p.add_argument("--fine-grained-instruction", default=None, help=v1)
    return p.parse_args(argv)


def parse_state(text: str | None, dim: int) -> list:
    if text is None:
        return [0.0] * dim
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ClientError(f"--state: expected comma-separated numbers, got {text!r}", 2) from None


def load_state_file(path: str) -> list:
    """A .pt tensor (read with weights_only=True: no code runs) or a .npy array (no pickles) of
    shape (state_dim,) or (1, state_dim) -> list of floats."""
    if not Path(path).is_file():
        raise ClientError(f"--state-path: file not found: {path}", 2)
    try:
        if path.endswith(".pt"):
            import torch

            value = torch.load(path, map_location="cpu", weights_only=True)
            value = value.float().numpy() if isinstance(value, torch.Tensor) else value
        elif path.endswith(".npy"):
            value = np.load(path, allow_pickle=False)
        else:
            raise ClientError(f"--state-path: expected a .pt or .npy file, got {path}", 2)
        state = np.asarray(value, dtype=np.float64)
    except ClientError:
        raise
    except Exception as e:  # unreadable file, pickled object, non-numeric content
        raise ClientError(f"--state-path: cannot read {path}: {e}", 2) from None
    if state.ndim == 2 and state.shape[0] == 1:
        state = state[0]
    if state.ndim != 1:
        raise ClientError(
            f"--state-path: expected shape (state_dim,) or (1, state_dim), got {state.shape}", 2
        )
    return state.tolist()


def read_images(args) -> tuple:
    """-> ({image key: base64 text}, {slot: bool}); a missing file is an error, not a masked
    camera (that takes --mask)."""
    images, masks = {}, {}
    for camera, attr, slot in CAMERAS:
        path, key = getattr(args, attr), IMAGE_PREFIX + slot
        option = "--" + attr.replace("_", "-")
        if path and camera in args.mask:
            raise ClientError(f"{option} and --mask {camera}: give one or the other", 2)
        if path and not Path(path).is_file():
            raise ClientError(
                f"{option}: file not found: {path} (to send {camera} masked: --mask {camera})", 2
            )
        if path:
            images[key] = base64.b64encode(Path(path).read_bytes()).decode("utf-8")
        masks[slot] = key in images
    if not images:
        raise ClientError(
            "no image: give at least one of --base-img, --left-wrist-img, --right-wrist-img", 2
        )
    return images, masks


def build_body(args) -> dict:
    if args.state_path:
        state = load_state_file(args.state_path)
    else:
        state = parse_state(args.state, args.state_dim)
    images, masks = read_images(args)
    body = {
        "instruction": args.instruction,
        "images": [images],
        "image_masks": [masks],
        "eef_pose": [state],
        "state": [state],
        "qpos": [state],
        "num_steps": args.num_steps,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "high_level_instruction": args.high_level_instruction,
        "fine_grained_instruction": args.fine_grained_instruction,
    }
    if args.seed is not None:
        body["seed"] = args.seed
    return body


def request_json(url: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise ClientError(f"server answered {e.code}: {_error_text(e)}", 1) from None
    except (socket.timeout, TimeoutError):
        raise ClientError(f"no answer from {url} within {timeout:g} s (--timeout)", 4) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise ClientError(f"no answer from {url} within {timeout:g} s (--timeout)", 4) from None
        raise ClientError(
            f"cannot reach the server at {url}: {e.reason}. Is it running? "
            "(python run.py --config-path ./examples/pi0/conf --config-name serve action=run)",
            3,
        ) from None
    except (ConnectionError, OSError) as e:
        raise ClientError(f"connection to {url} failed: {e}", 3) from None


def _error_text(err: urllib.error.HTTPError) -> str:
    raw = err.read()
    try:
        return json.loads(raw).get("error") or raw.decode("utf-8", "replace")
    except (ValueError, AttributeError):
        return raw.decode("utf-8", "replace")[:500]


def report(reply: dict, latencies_ms: list) -> np.ndarray:
    actions = np.asarray(reply.get("actions", reply.get("qpos")), dtype=np.float32)
    print(f"actions shape: {list(actions.shape)} (batch, horizon, action_dim)")
    with np.printoptions(precision=4, suppress=True):
        print(f"first step: {actions[0, 0, :8]}{' ...' if actions.shape[-1] > 8 else ''}")
    print(f"num_steps: {reply.get('num_steps')}  seed: {reply.get('seed')}")
    timing = reply.get("timing") or {}
    parts = ", ".join(
        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in timing.items()
    )
    print(f"server timing (ms): {parts}")
    lat = np.asarray(latencies_ms)
    if len(lat) == 1:
        print(f"round trip: {lat[0]:.1f} ms")
    else:
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        print(f"round trip over {len(lat)}: p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms")
    return actions


def rtc_leftover(args, reply: dict | None) -> np.ndarray | None:
    """The previous reply's first chunk without its first --rtc-executed actions (None: no RTC)."""
    if args.rtc_delay is None or reply is None:
        return None
    chunk = np.asarray(reply["actions"][0], dtype=np.float64)
    if not 0 <= args.rtc_executed < len(chunk):
        raise ClientError(f"--rtc-executed: must be in 0..{len(chunk) - 1}", 2)
    return chunk[args.rtc_executed :]


def report_rtc(reply: dict, leftover: np.ndarray, delay: int) -> None:
    actions = np.asarray(reply["actions"][0], dtype=np.float64)
    n = min(delay, len(leftover))
    diff = np.abs(actions[:n] - leftover[:n]).mean() if n else float("nan")
    print(
        f"rtc: guided={reply.get('rtc_guided')}, first {n} actions vs the leftover: "
        f"mean abs diff {diff:.4f}"
    )


def save(path: str, reply: dict, actions: np.ndarray) -> None:
    if path.endswith(".npy"):
        np.save(path, actions)
    elif path.endswith(".json"):
        Path(path).write_text(json.dumps(reply))
    else:
        raise ClientError(f"--output: use a .npy or .json file name, got {path!r}", 2)
    print(f"saved {path}")


def run(args) -> int:
    base = f"http://{args.host}:{args.port}"
    if args.health:
        print(json.dumps(request_json(f"{base}/health", None, args.timeout), indent=2))
        return 0
    if args.repeat < 1:
        raise ClientError("--repeat: must be >= 1", 2)
    if args.rtc_delay is not None and args.rtc_delay < 0:
        raise ClientError("--rtc-delay: must be >= 0", 2)
    body = build_body(args)
    latencies, reply = [], None
    for _ in range(args.repeat):
        leftover = rtc_leftover(args, reply)
        if leftover is not None:
            body["rtc"] = {
                "prev_chunk_left_over": leftover.tolist(),
                "inference_delay": args.rtc_delay,
            }
        start = time.perf_counter()
        reply = request_json(f"{base}/infer", body, args.timeout)
        latencies.append((time.perf_counter() - start) * 1000.0)
        if not reply.get("success", False):
            raise ClientError(f"server answered: {reply.get('error', reply)}", 1)
        if leftover is not None:
            report_rtc(reply, leftover, args.rtc_delay)
    actions = report(reply, latencies)
    if args.output:
        save(args.output, reply, actions)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
