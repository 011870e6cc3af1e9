"""FlagScale's current Pi serving contract against our server: their config files (copies in
fixtures/flagscale, paths edited as a user edits them), the HTTP body their client_pi0.py sends,
the messages their websocket server (run_serve_vla.py) takes, their client flags in ours. Actions
are checked value by value against policy.infer on the same inputs and noise seed."""

import base64
import io
import json
import subprocess
import sys

from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import torch
import yaml

from PIL import Image
from serve_helpers import CLIENT, SAMPLE_IMAGES, LiveServer

from flagscale.serve.app import create_app
from flagscale.serve.config import ConfigError, load_serve_config

FIXTURES = Path(__file__).parent / "fixtures" / "flagscale"
SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
STATE = np.linspace(-0.5, 0.5, 14)
INSTRUCTION = "Grab the orange and put it into the basket."


def write_workspace(root, preset: str, seed: int) -> dict:
    """What FlagScale's README downloads (checkpoint, paligemma tokenizer, dataset stats.json with
    mean/std and quantiles), as a tiny random checkpoint of `preset`."""
    from flagscale.models.pi0 import PI0Policy
    from flagscale.models.pi0.tokenizer import build_test_tokenizer
    from flagscale.models.pi0.weights import save_pretrained

    tokenizer = build_test_tokenizer(str(root / "paligemma-3b-pt-224"))
    source = PI0Policy.random(
        preset, device="cpu", dtype="float32", seed=seed, tokenizer_path=tokenizer
    )
    save_pretrained(source.model, str(root / "model"))
    rng = np.random.default_rng(seed)
    stats = {}
    for key in ("observation.state", "action"):
        low = rng.uniform(-2, -1, 14)
        stats[key] = {
            "mean": rng.normal(size=14).tolist(),
            "std": rng.uniform(0.5, 2, 14).tolist(),
            "q01": low.tolist(),
            "q99": (low + rng.uniform(2, 4, 14)).tolist(),
        }
    (root / "stats.json").write_text(json.dumps(stats))
    paths = {"model": str(root / "model"), "tokenizer": tokenizer}
    return {**paths, "stat_path": str(root / "stats.json")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("workspace"), "tiny", 3)


@pytest.fixture(scope="module")
def workspace05(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("workspace05"), "pi05_tiny", 4)


def edited(name: str, workspace: dict, **changes) -> list:
    """Their task file with the checkpoint paths and device edited (plus `changes`)."""
    data = yaml.safe_load((FIXTURES / name).read_text())
    data[0]["engine_args"].update(workspace, device="cpu", **changes)
    return data


@pytest.fixture(scope="module")
def served(workspace):
    """Our server started from their pi0 task file (bound to loopback, noise seed 0)."""
    cfg = load_serve_config(edited("pi0/serve/pi0.yaml", workspace, host="127.0.0.1", seed=0))
    app = create_app(None, cfg)
    with LiveServer(app) as server:
        server.wait_ready()
        yield server


def test_their_pi0_task_file_maps_onto_engine(workspace):
    cfg = load_serve_config(edited("pi0/serve/pi0.yaml", workspace), env={})
    assert (cfg.host, cfg.port, cfg.device) == ("0.0.0.0", 5000, "cpu")
    assert (cfg.model, cfg.stat_path) == (workspace["model"], workspace["stat_path"])
    assert cfg.cameras == {f"observation.images.{s}": s for s in SLOTS}
    assert {f"observation.images.{s}" for s in SLOTS} <= set(cfg.openpi_images)
    assert "observation.state" in cfg.openpi_state_keys


def test_their_rename_map_feeds_http_and_websocket_keys(workspace):
    rename = {
        "observation.images.cam_high": "observation.images.base_0_rgb",
        "observation/wrist_image": "observation.images.left_wrist_0_rgb",
        "observation/state": "observation.state",
        "prompt": "task",
    }
    keys = ["observation.images.cam_high", "observation.images.right_wrist_0_rgb"]
    data = edited("pi0/serve/pi0.yaml", workspace, rename_map=rename, images_keys=keys)
    cfg = load_serve_config(data, env={})
    assert cfg.cameras == {keys[0]: "base_0_rgb", keys[1]: "right_wrist_0_rgb"}
    assert cfg.openpi_images["observation/wrist_image"] == "left_wrist_0_rgb"
    assert cfg.openpi_images["observation.images.cam_high"] == "base_0_rgb"
    assert cfg.openpi_prompt_key == "prompt"


def test_their_pi0_5_task_files_map_onto_engine(workspace, workspace05):
    """model_variant -> engine.model_variant; use_quantiles: false with pi0.5 -> mean/std (their
    run_serve_pi.py's rule); the run_serve_vla.py-era file has neither stats nor quantiles."""
    cfg = load_serve_config(edited("pi0_5/serve/pi0_5.yaml", workspace05), env={})
    assert (cfg.model_variant, cfg.port) == ("pi0.5", 5000)
    assert cfg.normalization_mapping == {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    quantiles = edited("pi0_5/serve/pi0_5.yaml", workspace05, use_quantiles=True)
    assert load_serve_config(quantiles, env={}).normalization_mapping == {}
    vla = load_serve_config(edited("pi0_5/serve/pi0_5_vla.yaml", workspace05), env={})
    assert (vla.model_variant, vla.normalization_mapping) == ("pi0.5", {})
    with pytest.raises(ConfigError, match=r"serve\[0\]\.engine_args\.model_variant: pi0.5 does"):
        load_serve_config(edited("pi0_5/serve/pi0_5.yaml", workspace), env={})  # a Pi0 checkpoint


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_quantilez": False}, "serve[0].engine_args.use_quantilez: unknown key; did you mean"),
        ({"port": "http"}, "serve[0].engine_args.port: expected an integer"),
        ({"model_variant": "pi1"}, "serve[0].engine_args.model_variant: must be one of pi0, pi0.5"),
        ({"use_quantiles": "no"}, "serve[0].engine_args.use_quantiles: expected true or false"),
        ({"images_keys": ["observation.images.top"]}, "images_keys[0]: 'observation.images.top'"),
        ({"rename_map": {"a": "observation.images.image"}}, "rename_map.a: 'observation.images"),
        ({"rename_map": {"a": "b"}}, "rename_map.a: target 'b' is not"),
        ({"state_key": 3}, "serve[0].engine_args.state_key: expected a non-empty string"),
        ({"normalization_mapping": {"state": "median"}}, "normalization_mapping.state: must be"),
        ({"normalization_mapping": {"images": "identity"}}, "normalization_mapping: must be one"),
    ],
)
def test_bad_engine_args_are_refused_by_name(workspace, change, message):
    with pytest.raises(ConfigError) as err:
        load_serve_config(edited("pi0/serve/pi0.yaml", workspace, **change), env={})
    assert message in str(err.value)


def test_list_shape_errors(workspace):
    one = edited("pi0/serve/pi0.yaml", workspace)
    with pytest.raises(ConfigError, match="serve: 2 list entries"):
        load_serve_config(one * 2, env={})
    with pytest.raises(ConfigError, match=r"serve\[0\]\.engine: unknown key"):
        load_serve_config([{"serve_id": "x", "engine": {}}], env={})


def jpeg_pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))


def reference(policy, images: dict, state, prompt: str, cfg) -> np.ndarray:
    """policy.infer on the same inputs with the server's noise seed, cut as the server cuts."""
    obs = {"images": images, "state": np.asarray(state, np.float32), "prompt": prompt}
    actions = policy.infer(obs, num_steps=cfg.num_steps, seed=cfg.seed)["actions"]
    return np.asarray(actions, np.float32)[: cfg.action_horizon, : cfg.action_dim]


def test_their_http_body_gets_policy_actions(served):
    """The body FlagScale's examples/pi0/client_pi0.py (build_payload) sends, as is."""
    reply = httpx.post(f"{served.url}/infer", json=their_body(), timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["success"] is True
    actions = np.asarray(reply.json()["actions"], np.float32)
    cfg, policy = served.app.state.cfg, served.app.state.worker.policy
    pixels = {s: jpeg_pixels(p) for s, p in zip(SLOTS, SAMPLE_IMAGES)}
    want = reference(policy, pixels, STATE, INSTRUCTION, cfg)
    assert actions.shape == (1, 50, 14)
    np.testing.assert_array_equal(actions[0], want)


@pytest.fixture(scope="module")
def served05(workspace05):
    """Our server started from their Pi0.5 task file (run_serve_pi.py era: use_quantiles false)."""
    data = edited("pi0_5/serve/pi0_5.yaml", workspace05, host="127.0.0.1", seed=0)
    cfg = load_serve_config(data)
    app = create_app(None, cfg)
    with LiveServer(app) as server:
        server.wait_ready()
        yield server


def test_their_pi0_5_http_body_gets_mean_std_actions(served05, workspace05):
    """use_quantiles: false -> the Pi0.5 checkpoint runs with mean/std normalization, as
    FlagScale's server runs it; the quantile (checkpoint default) actions differ."""
    from flagscale.models.pi0 import PI0Policy

    cfg, policy = served05.app.state.cfg, served05.app.state.worker.policy
    assert policy.metadata["model_variant"] == "pi0.5"
    assert {v["mode"] for v in policy.normalizer.describe().values()} == {"MEAN_STD"}
    reply = httpx.post(f"{served05.url}/infer", json=their_body(), timeout=60)
    assert reply.status_code == 200 and reply.json()["success"] is True, reply.text
    actions = np.asarray(reply.json()["actions"], np.float32)[0]
    pixels = {s: jpeg_pixels(p) for s, p in zip(SLOTS, SAMPLE_IMAGES)}
    np.testing.assert_array_equal(actions, reference(policy, pixels, STATE, INSTRUCTION, cfg))
    quantiles = PI0Policy.from_pretrained(
        workspace05["model"], workspace05["tokenizer"], workspace05["stat_path"],
        device="cpu", dtype=cfg.torch_dtype, progress=False,
    )  # fmt: skip
    assert quantiles.normalizer.describe()["state"]["mode"] == "QUANTILES"
    other = reference(quantiles, pixels, STATE, INSTRUCTION, cfg)
    assert np.abs(actions - other).max() > 1e-2


def their_body() -> dict:
    """The body FlagScale's examples/pi0/client_pi0.py (build_payload) sends."""
    keys = [f"observation.images.{s}" for s in SLOTS]
    images = {k: base64.b64encode(p.read_bytes()).decode() for k, p in zip(keys, SAMPLE_IMAGES)}
    return {"instruction": INSTRUCTION, "state": [STATE.tolist()], "images": [images]}


def test_their_http_errors_say_success_false(served):
    keys = {"observation.images.base_0_rgb": base64.b64encode(b"not a jpeg").decode()}
    for body, status in (
        ({"instruction": INSTRUCTION, "images": [keys]}, 422),  # no state
        ({"instruction": INSTRUCTION, "state": [STATE.tolist()], "images": [keys]}, 400),
        ({"state": [[0.0] * 3], "images": [{"observation.images.top": "x"}]}, 400),
    ):
        reply = httpx.post(f"{served.url}/infer", json=body, timeout=60)
        assert reply.status_code == status
        assert reply.json()["success"] is False and reply.json()["error"]


def pack_array(obj):
    """FlagScale's msgpack_numpy wire format (flagscale/serve/msgpack_numpy.py, same as openpi)."""
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str,
                b"shape": obj.shape}  # fmt: skip
    return obj


def unpack_array(obj):
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    return obj


def test_their_websocket_messages_get_policy_actions(served):
    """run_serve_vla.py's protocol: metadata first, then msgpack observations with dotted keys
    (observation.images.<slot> HWC uint8, observation.state, task) -> action / actions."""
    sync = pytest.importorskip("websockets.sync.client")
    rng = np.random.default_rng(5)
    frames = {s: rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for s in SLOTS}
    obs = {f"observation.images.{s}": frames[s] for s in SLOTS}
    obs.update({"observation.state": STATE.astype(np.float32), "task": "stack the cups"})
    with sync.connect(served.url.replace("http", "ws"), max_size=None) as ws:
        metadata = msgpack.unpackb(ws.recv(), object_hook=unpack_array)
        assert metadata["action_horizon"] == 50
        ws.send(msgpack.packb(obs, default=pack_array))
        reply = msgpack.unpackb(ws.recv(), object_hook=unpack_array)
    cfg, policy = served.app.state.cfg, served.app.state.worker.policy
    want = reference(policy, frames, STATE, "stack the cups", cfg)
    np.testing.assert_array_equal(reply["action"], want)
    np.testing.assert_array_equal(reply["actions"], want)
    assert reply["server_timing"]["infer_ms"] > 0
    assert httpx.get(f"{served.url}/healthz", timeout=10).text == "OK\n"


def run_client(*args):
    cmd = [sys.executable, str(CLIENT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_their_client_flags(served, tmp_path, suffix):
    """FlagScale's client flags: --img1/2/3, --state-path (.pt via torch.load(weights_only=True)
    or .npy), --instruction; the actions are the policy's."""
    path = tmp_path / f"state{suffix}"
    if suffix == ".pt":
        torch.save(torch.tensor(STATE[None], dtype=torch.float32), path)  # (1, state_dim)
    else:
        np.save(path, STATE.astype(np.float32))
    out = tmp_path / "actions.npy"
    images = [arg for i, p in enumerate(SAMPLE_IMAGES) for arg in (f"--img{i + 1}", p)]
    port = served.url.rsplit(":", 1)[1]
    proc = run_client("--port", port, *images, "--state-path", path, "--instruction", "go",
                      "--output", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cfg, policy = served.app.state.cfg, served.app.state.worker.policy
    pixels = {s: jpeg_pixels(p) for s, p in zip(SLOTS, SAMPLE_IMAGES)}
    want = reference(policy, pixels, STATE.astype(np.float32), "go", cfg)
    np.testing.assert_array_equal(np.load(out)[0], want)


def test_pi0_5_demo_with_their_client_flags(tmp_path):
    """examples/pi0_5 (FlagScale's Pi0.5 port 5000 on a real deployment) with FlagScale's client
    flags: the actions are the Pi0.5 policy's."""
    from serve_helpers import REPO

    cfg = load_serve_config(REPO / "examples/pi0_5/conf/serve/pi0_5_demo.yaml", env={})
    assert (cfg.port, cfg.model_variant) == (5000, "pi0.5")
    app = create_app(None, cfg)
    path, out = tmp_path / "state.pt", tmp_path / "actions.npy"
    torch.save(torch.tensor(STATE, dtype=torch.float32), path)
    images = [arg for i, p in enumerate(SAMPLE_IMAGES) for arg in (f"--img{i + 1}", p)]
    with LiveServer(app) as server:
        server.wait_ready()
        port = server.url.rsplit(":", 1)[1]
        proc = run_client("--port", port, *images, "--state-path", path, "--instruction", "go",
                          "--output", out)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        policy = server.app.state.worker.policy
        pixels = {s: jpeg_pixels(p) for s, p in zip(SLOTS, SAMPLE_IMAGES)}
        want = reference(policy, pixels, STATE.astype(np.float32), "go", cfg)
    assert policy.metadata["model_variant"] == "pi0.5"
    np.testing.assert_array_equal(np.load(out)[0], want)


def test_client_refuses_a_pickled_state_file(tmp_path, served):
    """torch.load(weights_only=True): a .pt holding an arbitrary object is refused, not run."""
    path = tmp_path / "state.pt"
    marker = tmp_path / "ran"
    torch.save({"x": Exploit(str(marker))}, path)
    images = ["--img1", SAMPLE_IMAGES[0]]
    proc = run_client("--port", served.url.rsplit(":", 1)[1], *images, "--state-path", path)
    assert proc.returncode == 2 and "--state-path: cannot read" in proc.stderr
    assert not marker.exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.slow
@pytest.mark.parametrize("example", ["pi0", "pi0_5"])
def test_their_experiment_files_start_our_server(workspace, workspace05, tmp_path, example):
    """`python run.py --config-path <their conf> --config-name serve action=test` with their
    experiment file (entrypoint flagscale/serve/run_serve_vla.py) and list-form task file, paths
    edited (and, for pi0_5, use_fs_serve=false: no Ray here): our server starts, answers one
    /infer and stops."""
    from serve_helpers import REPO, free_port

    conf = tmp_path / "conf"
    (conf / "serve").mkdir(parents=True)
    (conf / "serve.yaml").write_text((FIXTURES / example / "serve.yaml").read_text())
    paths = workspace05 if example == "pi0_5" else workspace
    task = edited(f"{example}/serve/{example}.yaml", paths, host="127.0.0.1", port=free_port())
    (conf / "serve" / f"{example}.yaml").write_text(yaml.safe_dump(task))
    argv = [sys.executable, "run.py", "--config-path", str(conf), "--config-name", "serve"]
    argv += [f"experiment.exp_dir={tmp_path / 'exp'}", "action=test"]
    argv += ["experiment.runner.deploy.use_fs_serve=false"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "run_serve_vla.py: FlagScale's server; running ours" in text
    assert "test /infer: HTTP 200" in text and "actions shape [1, 50, 14]" in text
