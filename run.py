"""FlagScale-compatible launcher.

    python run.py --config-path ./examples/pi0/conf --config-name serve action=run
    python run.py --config-path ./examples/pi0/conf --config-name serve action=stop

Any Hydra override works (``serve.engine.port=9011``, ``+experiment.envs.FOO=1``).
"""

import sys

from pathlib import Path

import hydra

from omegaconf import DictConfig

from flagscale.runner.dispatch import dispatch

REPO_ROOT = Path(__file__).resolve().parent


@hydra.main(version_base=None, config_name="config")
def main(cfg: DictConfig) -> None:
    sys.exit(dispatch(cfg, REPO_ROOT))


if __name__ == "__main__":
    main()
