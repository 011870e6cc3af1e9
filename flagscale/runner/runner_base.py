"""Base class and shared config handling for runners (FlagScale's ``runner_base``)."""

import os

from abc import ABC, abstractmethod
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from flagscale.logger import get_logger

logger = get_logger("flagscale.runner")


class RunnerError(Exception):
    """A user-facing launcher error: printed as one clear message, exit code non-zero."""


def check_and_reset_deploy_config(cfg: DictConfig) -> None:
    """Move legacy ``experiment.deploy`` to ``experiment.runner.deploy`` (as FlagScale does)."""
    experiment = cfg.get("experiment")
    if experiment is None or experiment.get("deploy") is None:
        return
    logger.warning(
        "experiment.deploy is deprecated; moving it to experiment.runner.deploy "
        "(update your YAML: experiment.runner.deploy)"
    )
    with open_dict(cfg):
        if experiment.get("runner") is None:
            experiment.runner = {}
        experiment.runner.deploy = experiment.deploy
        del experiment["deploy"]


class RunnerBase(ABC):
    """Holds the config; makes ``experiment.exp_dir`` absolute so every derived path is."""

    def __init__(self, cfg: DictConfig, repo_root: Path):
        self.cfg = cfg
        self.repo_root = Path(repo_root).resolve()
        experiment = cfg.get("experiment")
        if experiment is None or not experiment.get("exp_dir"):
            raise RunnerError("experiment.exp_dir is required")
        exp_dir = os.path.abspath(str(experiment.exp_dir))
        with open_dict(cfg):
            experiment.exp_dir = exp_dir
        self.exp_dir = Path(exp_dir)
        self.runner_cfg = experiment.get("runner") or OmegaConf.create({})

    @abstractmethod
    def run(self) -> int:
        """Start the task; return the process exit code."""

    @abstractmethod
    def test(self) -> int:
        """Start, check one request end to end, stop; return the exit code."""

    @abstractmethod
    def stop(self) -> int:
        """Stop what ``run`` started; return the exit code."""
