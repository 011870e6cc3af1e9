"""Hydra callbacks named in the example experiment YAMLs (`hydra.callbacks`)."""

from pathlib import Path

from hydra.experimental.callback import Callback

from flagscale.logger import get_logger

logger = get_logger("flagscale.runner")


class OutputDirCheck(Callback):
    """Hydra creates hydra.run.dir (under experiment.exp_dir) before run.py's code runs, and a
    failure there ends in a traceback: check it first and exit 1 with one line naming the key
    (SystemExit: Hydra turns a callback's exceptions into warnings)."""

    def on_run_start(self, config, **kwargs) -> None:
        path = Path(str(config.hydra.run.dir))
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            logger.error(
                "experiment.exp_dir: cannot create %s (hydra.run.dir): %s; choose a writable "
                "experiment.exp_dir",
                path,
                err.strerror or err,
            )
            raise SystemExit(1) from None
