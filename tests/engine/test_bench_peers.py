"""benchmarks/bench_peers.py plumbing on the CPU: our worker in its own process (tiny model), the
result table and ratio, the FlagScale wheel extraction, and a failing peer reported, not raised."""

import json
import os
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_peers  # noqa: E402


def test_ours_in_its_own_process(tmp_path):
    out = tmp_path / "peers.json"
    argv = ["--device", "cpu", "--dtype", "float32", "--tiny", "--iters", "2", "--warmup", "1"]
    argv += ["--peers", "ours", "--out", str(out), "--peer-root", str(tmp_path / "peers")]
    bench_peers.orchestrate(bench_peers.parse_args(argv))
    result = json.loads(out.read_text())["results"][0]
    assert result["peer"] == "ours" and result["variant"] == "tiny" and result["tokens"] == 48
    assert result["stats"]["n"] == 2 and result["stats"]["p50"] > 0


def test_table_ratio_and_failed_peer():
    results = [
        {"peer": "ours", "stats": {"p50": 10.0, "p90": 11.0}, "peak_gb": 6.5},
        {"peer": "flagscale", "stats": {"p50": 250.0, "p90": 260.0}, "peak_gb": None},
        {"peer": "lerobot", "error": "exit 1", "log_tail": "..."},
    ]
    lines = bench_peers.table(results, "pi0").splitlines()
    assert lines[2] == "| ours | 10.00 | 11.00 | 6.50 | 1.0x |"
    assert lines[3] == "| flagscale | 250.00 | 260.00 | - | 25.0x |"
    assert lines[4].startswith("| lerobot | failed: exit 1")


def test_flagscale_extracts_only_its_code(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "flag_scale-0.8.0-py3-none-any.whl", "w") as z:
        z.writestr("flag_scale/flagscale/models/pi0/modeling_pi0.py", "# code\n")
        z.writestr("flag_scale/examples/pi0/README.md", "docs\n")
    path = bench_peers._with_flagscale("flagscale", str(wheels), str(tmp_path), ["site"])
    first = path.split(os.pathsep)[0]
    assert os.path.isfile(os.path.join(first, "flagscale", "models", "pi0", "modeling_pi0.py"))
    assert not os.path.exists(os.path.join(first, "examples"))
    assert path.split(os.pathsep)[1:] == ["site"]


def test_av_stand_in_fails_loudly(tmp_path):
    folder = bench_peers.av_stub(str(tmp_path))
    sys.path.insert(0, folder)
    try:
        import av

        assert av.logging.WARNING == 24
        try:
            av.open("x.mp4")
        except ImportError as err:
            assert "stand-in" in str(err)
        else:
            raise AssertionError("av.open should raise")
    finally:
        sys.path.remove(folder)
        sys.modules.pop("av", None)
