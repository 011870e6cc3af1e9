"""load_serve_config: every file form, v1 compatibility, and one clear error per bad key."""

import json

import numpy as np
import pytest
import yaml

from serve_helpers import REPO

from flagscale.serve import config as config_module
from flagscale.serve.config import ConfigError, ServeConfig, load_serve_config

CONF = REPO / "examples" / "pi0" / "conf"


def engine(**values):
    return {"engine": {"random_init": True, **values}}


def error_of(serve, env=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_serve_config(serve, env=env or {})
    return str(info.value)


@pytest.fixture
def warnings_seen(monkeypatch):
    """Collect config warnings (the flagscale logger does not propagate to caplog)."""
    seen = []
    monkeypatch.setattr(config_module, "_warned_unused", set())
    monkeypatch.setattr(config_module.logger, "warning", lambda msg, *a: seen.append(msg % a))
    return seen


def test_demo_task_file_loads():
    cfg = load_serve_config(CONF / "serve" / "pi0_demo.yaml", env={})
    assert cfg.random_init and cfg.preset == "tiny" and cfg.device == "cpu"
    assert cfg.port == 9010 and cfg.host == "127.0.0.1"
    assert cfg.cameras == {
        "cam_high": "base_0_rgb",
        "cam_left_wrist": "left_wrist_0_rgb",
        "cam_right_wrist": "right_wrist_0_rgb",
    }


@pytest.mark.parametrize(
    "values,expected",
    [
        ({}, [1, 2, 3, 4, 5, 6, 7, 8]),  # the default max_batch_size 8: every size
        ({"max_batch_size": 3}, [1, 2, 3]),
        ({"max_batch_size": 40}, [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 40]),
        ({"batch_buckets": [4, 1, 2, 2]}, [1, 2, 4, 8]),  # max_batch_size is always a bucket
        ({"batch_buckets": [1, 2], "max_batch_size": 2}, [1, 2]),
    ],
)
def test_batch_buckets(values, expected):
    from flagscale.serve.engine import batch_buckets

    assert batch_buckets(load_serve_config(engine(**values), env={})) == expected


def write_stats(path, state=14, action=14, edits=()):
    stats = {
        "observation.state": {"mean": [0.0] * state, "std": [1.0] * state},
        "action": {"mean": [0.0] * action, "std": [1.0] * action},
    }
    stats.update(edits)
    path.write_text(json.dumps(stats))
    return path


def fake_checkpoint(tmp_path, files=("config.json", "model.safetensors")):
    model, tok = tmp_path / "pi0", tmp_path / "tok"
    model.mkdir(), tok.mkdir()
    for name in files:
        (model / name).write_text("{}")
    (tok / "tokenizer.model").write_text("")
    return model, tok


def test_resolved_full_config_file_with_real_dirs(tmp_path):
    """What the launcher writes: experiment + serve + action; the production task file's keys."""
    model, tok = fake_checkpoint(tmp_path)
    stats = write_stats(tmp_path / "stats.json")
    serve = yaml.safe_load((CONF / "serve" / "pi0.yaml").read_text())
    serve["engine"].update(model=str(model), tokenizer=str(tok), stat_path=str(stats))
    serve["engine"]["results_path"] = "outputs/pi0/results"
    full = {"experiment": {"exp_name": "pi0"}, "serve": serve, "action": "run"}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(full))
    cfg = load_serve_config(path, env={})
    assert cfg.model == str(model) and cfg.tokenizer == str(tok) and cfg.stat_path == str(stats)
    assert cfg.torch_dtype == "bfloat16" and not cfg.random_init
    assert cfg.max_body_bytes == 32 * 1024 * 1024


def test_omegaconf_dictconfig_is_accepted():
    from omegaconf import OmegaConf

    cfg = load_serve_config(OmegaConf.create({"serve": engine(port=9011)}), env={})
    assert cfg.port == 9011


def test_v1_task_file_keys_load_and_unused_ones_warn_once(warnings_seen):
    v1 = {
        "engine": {
            "host": "0.0.0.0",
            "port": 5000,
            "random_init": True,
            "uvicorn_log_level": "warning",
            "loader": "pi0",
            "results_path": "outputs/pi0/results",
            "device": "cuda",
            "output_format": "image",
            "torch_dtype": "torch.float32",
            "transformations": {"LogIOTransformation": {"log_level": "info"}},
        },
        "generate": {
            "images_keys": ["observation.images.camera0"],
            "images_shape": [3, 480, 640],
            "batch_size": 2,
            "action_dim": 7,
            "action_horizon": 10,
            "state_key": "observation.state",
            "instruction": {"task": ["retro cars"]},
        },
    }
    cfg = load_serve_config(v1, env={})
    load_serve_config(v1, env={})
    assert cfg.torch_dtype == "float32" and cfg.host == "0.0.0.0"
    assert (cfg.state_dim, cfg.action_dim, cfg.action_horizon) == (7, 7, 10)  # from generate
    assert len(warnings_seen) == 1
    for key in ("engine.loader", "engine.transformations", "generate.images_keys"):
        assert key in warnings_seen[0]
    assert "generate.action_dim" not in warnings_seen[0]


def test_engine_dims_win_over_generate():
    cfg = load_serve_config(
        {**engine(action_dim=14, action_horizon=50), "generate": {"action_horizon": 10}}, env={}
    )
    assert (cfg.action_dim, cfg.action_horizon) == (14, 50)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("1", "flaggems"),
        ("true", "flaggems"),
        ("True", "flaggems"),
        ("YES", "flaggems"),
        ("false", "native"),
        ("0", "native"),
        ("", "native"),
    ],
)
def test_use_flaggems_env(value, expected):
    assert load_serve_config(engine(), env={"USE_FLAGGEMS": value}).ops == expected


def test_config_ops_flaggems_without_env():
    assert load_serve_config(engine(ops="FlagGems"), env={}).ops == "flaggems"


@pytest.mark.parametrize(
    "value, expected", [("auto", "auto"), ("AUTO", "auto"), (True, "true"), ("off", "false")]
)
def test_fused_kernels_values(value, expected):
    assert load_serve_config(engine(fused_kernels=value), env={}).fused_kernels == expected
    assert load_serve_config(engine(), env={}).fused_kernels == "auto"  # the default
    assert "serve.engine.fused_kernels" in error_of(engine(fused_kernels="sometimes"))


def test_fp8_needs_native_ops():
    message = error_of(engine(precision="fp8", ops="flaggems"))
    assert "serve.engine.precision: fp8 needs native ops" in message and "'flaggems'" in message
    assert load_serve_config(engine(precision="fp8", ops="native"), env={}).precision == "fp8"


@pytest.mark.parametrize(
    "key, value, instead",
    [
        ("fused_kernels", True, "auto or false"),
        ("precision", "fp8", "bf16"),
        ("image_decoder", "gpu", "cpu"),
    ],
)
def test_cuda_only_settings_are_refused_on_cpu(key, value, instead):
    message = error_of(engine(device="cpu", **{key: value}))
    assert f"serve.engine.{key}:" in message and "needs a CUDA device" in message
    assert "serve.engine.device is 'cpu'" in message and f"use {instead}" in message
    assert getattr(load_serve_config(engine(device="cuda", **{key: value}), env={}), key)


BAD = [
    (
        "unknown key",
        engine(num_step=4),
        "serve.engine.num_step: unknown key; did you mean 'num_steps'?",
    ),
    (
        "unknown section",
        {**engine(), "generat": {}},
        "serve.generat: unknown key; did you mean 'generate'?",
    ),
    (
        "unknown generate key",
        {**engine(), "generate": {"action_dims": 3}},
        "did you mean 'action_dim'",
    ),
    ("no engine", {"generate": {}}, "serve.engine: missing"),
    ("list form", {"serve": [{"serve_id": "vllm_model"}]}, "serve[0].engine_args: missing"),
    (
        "float16",
        engine(torch_dtype="float16"),
        "serve.engine.torch_dtype: 'float16' is not supported",
    ),
    ("unknown dtype", engine(torch_dtype="int8"), "serve.engine.torch_dtype: unknown dtype 'int8'"),
    ("steps zero", engine(num_steps=0), "serve.engine.num_steps: must be >= 1, got 0"),
    ("steps above max", engine(num_steps=20, max_num_steps=10), "num_steps: must be in 1..10"),
    ("steps not int", engine(num_steps="ten"), "serve.engine.num_steps: expected an integer"),
    ("port range", engine(port=70000), "serve.engine.port: must be in 1..65535, got 70000"),
    ("bad device", engine(device="gpu"), "serve.engine.device: expected cpu, cuda or cuda:N"),
    ("bad ops", engine(ops="flaggem"), "did you mean 'flaggems'?"),
    ("bad preset", engine(preset="pi1"), "serve.engine.preset: must be one of pi0, tiny, pi05"),
    ("bad bool", engine(warmup="maybe"), "serve.engine.warmup: expected true or false"),
    (
        "bad slot",
        engine(cameras={"cam_high": "base_rgb"}),
        "serve.engine.cameras.cam_high: unknown image slot",
    ),
    ("slot twice", engine(cameras={"a": "base_0_rgb", "b": "base_0_rgb"}), "already used"),
    ("no cameras", engine(cameras={}), "serve.engine.cameras: expected a non-empty mapping"),
    (
        "log level",
        engine(uvicorn_log_level="loud"),
        "serve.engine.uvicorn_log_level: must be one of",
    ),
    ("batch size", engine(max_batch_size=0), "serve.engine.max_batch_size: must be in 1..256"),
    ("wait", engine(max_wait_ms=-1), "serve.engine.max_wait_ms: must be in 0.0..1000.0"),
    ("buckets scalar", engine(batch_buckets=4), "serve.engine.batch_buckets: expected a list"),
    ("bucket zero", engine(batch_buckets=[0, 2]), "serve.engine.batch_buckets[0]: must be in"),
    ("graphs zero", engine(max_graphs=0), "serve.engine.max_graphs: must be in 1..4096"),
    (
        "bucket too big",
        engine(batch_buckets=[1, 16], max_batch_size=8),
        "serve.engine.batch_buckets: [16] exceed max_batch_size 8",
    ),
    ("seed", engine(seed=-3), "serve.engine.seed: must be in 0.."),
    (
        "no model",
        {"engine": {"random_init": False}},
        "serve.engine.model: required when random_init is false",
    ),
    (
        "model dir",
        {"engine": {"model": "/no/such/model"}},
        "serve.engine.model: directory not found: /no/such/model",
    ),
    (
        "tokenizer dir",
        engine(tokenizer="/no/such/tok"),
        "serve.engine.tokenizer: directory not found",
    ),
    (
        "stat file",
        engine(stat_path="/no/stats.json"),
        "serve.engine.stat_path: file not found: /no/stats.json",
    ),
    ("noise file", engine(fixed_noise="/no/noise.npy"), "serve.engine.fixed_noise: file not found"),
]


@pytest.mark.parametrize("serve,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_names_the_key(serve, message):
    assert message in error_of(serve)


@pytest.mark.parametrize(
    "files,tokenizer,message",
    [
        (("model.safetensors",), True, "serve.engine.model: no config.json in"),
        (("config.json",), True, "no model.safetensors or model.safetensors.index.json in"),
        (("config.json", "model.safetensors"), False, "serve.engine.tokenizer: required"),
    ],
)
def test_checkpoint_dir_is_checked(tmp_path, files, tokenizer, message):
    model, tok = fake_checkpoint(tmp_path, files)
    serve = {"engine": {"model": str(model), "tokenizer": str(tok) if tokenizer else None}}
    assert message in error_of(serve)


def test_tokenizer_may_live_in_the_model_dir(tmp_path):
    model, _ = fake_checkpoint(tmp_path, ("config.json", "model.safetensors.index.json"))
    (model / "tokenizer.json").write_text("{}")
    assert load_serve_config({"engine": {"model": str(model)}}, env={}).tokenizer is None


def test_tokenizer_dir_needs_tokenizer_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "serve.engine.tokenizer: no tokenizer.json" in error_of(engine(tokenizer=str(empty)))


def test_fixed_noise_file_is_checked(tmp_path):
    good, flat = tmp_path / "noise.npy", tmp_path / "flat.npy"
    np.save(good, np.zeros((50, 32), np.float32))
    np.save(flat, np.zeros(50, np.float32))
    assert load_serve_config(engine(fixed_noise=str(good)), env={}).fixed_noise == str(good)
    assert "expected a 2-D float array" in error_of(engine(fixed_noise=str(flat)))


def test_missing_file_and_bad_yaml(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve: [unclosed")
    assert "invalid YAML" in error_of(bad)


def test_serve_config_passes_through_and_is_import_light():
    cfg = ServeConfig()
    assert load_serve_config(cfg) is cfg
    import subprocess
    import sys

    code = "import sys, flagscale.serve.config; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_env_default_is_os_environ(monkeypatch):
    monkeypatch.setenv("USE_FLAGGEMS", "1")
    assert load_serve_config(engine()).ops == "flaggems"


@pytest.mark.parametrize("variant,ops", [("pi0", "native"), ("pi0_flaggems", "flaggems")])
def test_shipped_serve_variants_compose_and_validate(variant, ops):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "examples" / "pi0" / "conf"
    overrides = [
        f"serve={variant}",
        "serve.engine.random_init=true",
        "serve.engine.model=null",
        "serve.engine.tokenizer=null",
    ]
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="serve", overrides=overrides)
    serve = load_serve_config(OmegaConf.to_container(cfg, resolve=True), env={})
    assert serve.ops == ops and serve.port == 9010 and serve.device == "cuda"
    shipped = set(cfg.serve.engine) - {"random_init", "model", "tokenizer"}
    assert not shipped & set(config_module.V1_UNUSED_ENGINE_KEYS)  # we warn about those


def test_persistent_layers_switch():
    assert load_serve_config(engine(), env={}).persistent_layers is True  # the default
    assert load_serve_config(engine(persistent_layers="false"), env={}).persistent_layers is False
    assert "serve.engine.persistent_layers" in error_of(engine(persistent_layers="sometimes"))


def test_precision_choice():
    assert load_serve_config(engine(), env={}).precision == "bf16"
    assert load_serve_config(engine(precision="fp8"), env={}).precision == "fp8"
    message = error_of(engine(precision="fp16"))
    assert "precision" in message and "fp8" in message


@pytest.mark.parametrize(
    "stats,message",
    [
        (
            dict(state=7),
            "feature 'observation.state', key 'mean': 7 values, but serve.engine.state_dim is 14",
        ),
        (
            dict(action=7),
            "feature 'action', key 'mean': 7 values, but serve.engine.action_dim is 14",
        ),
        (
            dict(edits={"action": {"mean": [0.0] * 14, "std": [1.0] * 5}}),
            "feature 'action', key 'std': 5 values, but serve.engine.action_dim is 14",
        ),
        (
            dict(edits={"action": {"mean": [0.0] * 14, "std": "x"}}),
            "feature 'action', key 'std': expected a list of numbers",
        ),
        (dict(edits={"action": [1, 2]}), "feature 'action': expected a mapping of stats"),
    ],
)
def test_stats_file_is_checked_before_start(tmp_path, stats, message):
    """stats.json problems name the file, the feature and the key, at config load (pre-flight)."""
    path = write_stats(tmp_path / "stats.json", **stats)
    error = error_of(engine(stat_path=str(path)))
    assert error.startswith(f"serve.engine.stat_path: stats file {path}") and message in error


def test_stats_file_that_is_not_json(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text("{'a': 1}")
    assert f"stats file {path}: not valid JSON" in error_of(engine(stat_path=str(path)))


def test_every_missing_path_is_reported_at_once():
    serve = {"engine": {"model": "/no/m", "tokenizer": "/no/t", "stat_path": "/no/s.json"}}
    error = error_of(serve)
    for part in (
        "serve.engine.model: directory not found: /no/m",
        "serve.engine.tokenizer: directory not found: /no/t",
        "serve.engine.stat_path: file not found: /no/s.json",
    ):
        assert part in error, error


def test_shipped_task_files_carry_no_key_we_warn_about():
    for path in sorted(REPO.glob("examples/*/conf/serve/*.yaml")):
        engine = yaml.safe_load(path.read_text()).get("engine") or {}
        assert not set(engine) & set(config_module.V1_UNUSED_ENGINE_KEYS), path
