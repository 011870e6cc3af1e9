"""Launcher hardening (issue 19): timeouts, the exp_dir lock, the start token, secrets on disk."""

import pytest

from omegaconf import OmegaConf

from flagscale.runner.runner_base import RunnerError
from flagscale.runner.runner_serve import ServeRunner


def runner(tmp_path, runner_cfg=None, engine=None) -> ServeRunner:
    cfg = OmegaConf.create(
        {
            "experiment": {
                "exp_dir": str(tmp_path / "exp"),
                "task": {"type": "serve"},
                "runner": runner_cfg or {},
            },
            "serve": {"engine": engine or {}},
            "action": "run",
        }
    )
    return ServeRunner(cfg, tmp_path)


@pytest.mark.parametrize(
    "key, value",
    [("stop_timeout", -1), ("ready_timeout", -5), ("ready_timeout", "abc"), ("stop_timeout", True)],
)
def test_bad_timeouts_are_refused_naming_the_key(tmp_path, key, value):
    with pytest.raises(RunnerError, match=f"experiment.runner.{key}: expected a number of seconds"):
        runner(tmp_path, {key: value})


def test_stop_timeout_covers_the_drain_by_default(tmp_path):
    assert runner(tmp_path).stop_timeout == 10 + 10  # drain_timeout_s default + margin
    assert runner(tmp_path, engine={"drain_timeout_s": 45}).stop_timeout == 55
    assert runner(tmp_path, {"stop_timeout": 3, "ready_timeout": "7"}).stop_timeout == 3
    assert runner(tmp_path, {"ready_timeout": "7"}).ready_timeout == 7.0
