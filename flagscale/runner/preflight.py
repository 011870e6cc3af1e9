"""Pre-flight checks that need more than the serve config: the torch build and GPUs, FlagGems,
and the environment the server will get. Each failure names the override that fixes it."""

import importlib.util
import os

from typing import Any, Mapping

from flagscale.runner.runner_base import RunnerError

FLAGGEMS_INSTALL = (
    "pip install -e '.[flaggems]' && pip install --no-deps flag-gems==5.0.2 "
    "(a CUDA build of torch and a GPU; docs/flaggems.md)"
)


def check_use_flaggems(envs: Mapping[str, Any], shell: Mapping[str, str]) -> None:
    """USE_FLAGGEMS set in the shell and, to another value, in experiment.envs: refuse to guess."""
    from flagscale.ops import FLAGGEMS_ENV, flaggems_requested, flaggems_setting
    from flagscale.runner.launch import env_value

    in_shell, in_config = flaggems_setting(shell), flaggems_setting(envs)
    if in_shell is None or in_config is None:
        return
    configured = env_value(FLAGGEMS_ENV, in_config)
    if flaggems_requested(shell) != flaggems_requested({FLAGGEMS_ENV: configured}):
        raise RunnerError(
            f"USE_FLAGGEMS={in_shell} in the environment, but the config exports "
            f"experiment.envs.USE_FLAGGEMS={configured} to the server (the config would win): "
            f"pass experiment.envs.USE_FLAGGEMS={in_shell} on the command line, or "
            "unset USE_FLAGGEMS"
        )


def check_device(cfg, env: Mapping[str, str]) -> None:
    """serve.engine.device=cuda[:N] on a CPU-only torch or without a GPU the server would see."""
    if not str(cfg.device).startswith("cuda"):
        if cfg.ops == "flaggems":
            raise RunnerError(
                "FlagGems ops (serve.engine.ops=flaggems or USE_FLAGGEMS=1) need a CUDA GPU, but "
                f"serve.engine.device={cfg.device}; pass USE_FLAGGEMS=0 / serve.engine.ops=native"
            )
        return
    from flagscale.engine.device import cuda_missing_reason

    visible = env.get("CUDA_VISIBLE_DEVICES")
    index = int(cfg.device.split(":")[1]) if ":" in cfg.device else None
    why = cuda_missing_reason(
        index, count_devices=visible == os.environ.get("CUDA_VISIBLE_DEVICES")
    )
    if why is None and visible is not None and visible.strip() in ("", "-1"):
        why = f"experiment.envs.CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from the server"
    if why:
        raise RunnerError(
            f"serve.engine.device={cfg.device}: {why}; or serve on the CPU: "
            "serve.engine.device=cpu serve.engine.torch_dtype=float32"
        )
    if cfg.ops == "flaggems":
        check_flaggems_installed()


def check_flaggems_installed() -> None:
    missing = [name for name in ("flag_gems", "triton") if importlib.util.find_spec(name) is None]
    if missing:
        raise RunnerError(
            f"FlagGems ops are selected but {' and '.join(missing)} cannot be found; install: "
            f"{FLAGGEMS_INSTALL}; or serve with native ops: USE_FLAGGEMS=0 / "
            "serve.engine.ops=native"
        )
