"""compare_backends on CPU: metrics, targets, argument plumbing, a tiny native-vs-native run."""

import json
import subprocess
import sys

import numpy as np
import pytest

from flagscale.tools import compare_backends as cb


def test_metrics_identical():
    a = np.linspace(-1, 1, 101)
    m = cb.error_metrics(a, a)
    assert m["mape"] == m["max_abs"] == m["rel_l2"] == 0
    assert m["cosine"] == pytest.approx(1.0) and m["finite"]


def test_mape_blows_up_on_near_zero_elements_while_rel_l2_does_not():
    base = np.array([1.0, -2.0, 1e-4, 3.0])
    test = base + 1e-3  # the same tiny absolute error everywhere
    m = cb.error_metrics(test, base)
    assert m["mape"] > 100  # the 1e-4 element alone gives 1000 %
    assert m["median_ape"] < 0.2
    assert m["mape_big"] < 0.1  # elements with |b| >= 10 % rms only
    assert m["rel_l2"] < 0.1
    assert m["near_zero_share"] == 0.25


def test_nonfinite_and_shape_mismatch():
    assert not cb.error_metrics([np.nan, 1.0], [1.0, 1.0])["finite"]
    with pytest.raises(ValueError, match="shape mismatch"):
        cb.error_metrics(np.zeros(3), np.zeros(4))


def test_targets():
    good = dict(finite=True, rel_l2=0.5, mape=1.0)
    rows = cb.check_targets(good, {"rel_l2": 1.0}, {"rel_l2": 1.4})
    assert [r[3] for r in rows] == [True, True, True, True]
    bad = dict(finite=True, rel_l2=1.5, mape=1.5)
    rows = cb.check_targets(bad, {"rel_l2": 1.0}, {"rel_l2": 1.6})
    assert [r[3] for r in rows] == [True, False, False, False]


def test_latency_target_prefers_graphs():
    native = {"latency": {"eager": {"median_ms": 40.0}, "graphs": {"median_ms": 16.0}}}
    fast = {"latency": {"eager": {"median_ms": 80.0}, "graphs": {"median_ms": 19.6}}}
    [(name, ratio, limit, ok)] = cb.latency_target(native, fast)
    assert "graphs" in name and ratio == pytest.approx(1.225) and limit == 1.25 and ok
    slow = {"latency": {"eager": {"median_ms": 45.0}, "graphs": {"median_ms": 20.5}}}
    assert not cb.latency_target(native, slow)[0][3]
    failed_capture = {"latency": {"eager": {"median_ms": 45.0}, "graphs": {"error": "x"}}}
    [(name, ratio, _, ok)] = cb.latency_target(native, failed_capture)
    assert "eager" in name and ratio == pytest.approx(1.125) and ok
    assert cb.latency_target({"url": "a"}, {"url": "b"}) == []  # servers / no --latency


def test_parse_routes():
    assert cb.parse_routes(["linear=native", " attention = native "]) == {
        "linear": "native",
        "attention": "native",
    }
    with pytest.raises(SystemExit):
        cb.parse_routes(["linear"])


def test_needs_a_source():
    with pytest.raises(SystemExit):
        cb.parse_args([])


def test_child_commands_and_cold_cache(tmp_path):
    args = cb.parse_args(
        ["--random", "--preset", "tiny", "--warm-restart", "--cold-cache", "--latency", "5"]
        + ["--routes", "linear=native"]
    )
    runs = cb.plan_runs(args, tmp_path)
    labels = [label for label, _, _ in runs]
    assert labels == ["native", "flaggems", "flaggems (warm restart)", "fp32 reference"]
    native_cmd, cold, warm, ref = (cmd for _, cmd, _ in runs)
    assert "--routes" not in native_cmd and cold[cold.index("--routes") + 1] == "linear=native"
    assert cold[cold.index("--latency") + 1] == "0" and warm[warm.index("--latency") + 1] == "5"
    assert ref[ref.index("--dtype") + 1] == "float32" and "--round-weights" in ref
    cold_env = runs[1][2]
    assert cold_env["FLAGGEMS_CACHE_DIR"] == runs[2][2]["FLAGGEMS_CACHE_DIR"]
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    args.cache_dir = str(tmp_path / "used")
    with pytest.raises(SystemExit, match="not empty"):
        cb.plan_runs(args, tmp_path)


def test_server_body_is_a_v1_body():
    args = cb.parse_args(["--urls", "http://a", "http://b", "--steps", "3", "--cameras", "2"])
    info = {"cameras": {"cam_high": "base_0_rgb", "cam_left_wrist": "l", "cam_right_wrist": "r"}}
    body = cb.server_body(dict(info, state_dim=7), args)
    assert list(body["images"][0]) == ["cam_high", "cam_left_wrist"]
    assert len(body["eef_pose"][0]) == 7 and body["num_steps"] == 3 and body["seed"] == 0
    assert body == cb.server_body(dict(info, state_dim=7), args)  # same inputs every time
    json.dumps(body)


def test_tiny_run_native_vs_native(tmp_path):
    cmd = [sys.executable, "-m", "flagscale.tools.compare_backends", "--random", "--preset"]
    cmd += ["tiny", "--device", "cpu", "--candidate", "native", "--steps", "1"]
    cmd += ["--out", str(tmp_path), "--json", str(tmp_path / "r.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["candidate_vs_native"]["max_abs"] == 0
    assert report["native_vs_reference"]["rel_l2"] > 0  # bf16 vs fp32 math differs
    assert "PASS rel_l2" in out.stdout
