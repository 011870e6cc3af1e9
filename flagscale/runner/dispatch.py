"""``(task type, action)`` → runner method. Unknown pairs fail with the list of valid ones."""

from pathlib import Path
from typing import Callable, Dict, Tuple

from omegaconf import DictConfig

from flagscale.logger import get_logger
from flagscale.runner.runner_base import RunnerError, check_and_reset_deploy_config
from flagscale.runner.runner_serve import ServeRunner

logger = get_logger("flagscale.runner")

Handler = Callable[[DictConfig, Path], int]

HANDLERS: Dict[Tuple[str, str], Handler] = {
    ("serve", "run"): lambda cfg, root: ServeRunner(cfg, root).run(),
    ("serve", "test"): lambda cfg, root: ServeRunner(cfg, root).test(),
    ("serve", "stop"): lambda cfg, root: ServeRunner(cfg, root).stop(),
}


def valid_pairs() -> str:
    tasks: Dict[str, list] = {}
    for task, action in HANDLERS:
        tasks.setdefault(task, []).append(action)
    return "; ".join(f"{task}: {', '.join(sorted(actions))}" for task, actions in tasks.items())


def find_handler(task: str, action: str) -> Handler:
    handler = HANDLERS.get((task, action))
    if handler is None:
        raise RunnerError(
            f"unsupported task type / action: experiment.task.type={task!r} action={action!r}. "
            f"Valid (task type: actions): {valid_pairs()}"
        )
    return handler


def dispatch(cfg: DictConfig, repo_root: Path) -> int:
    """Run the handler for ``cfg``; a RunnerError becomes one error line and exit code 1."""
    try:
        check_and_reset_deploy_config(cfg)
        task = cfg.get("experiment", {}).get("task", {}).get("type")
        handler = find_handler(str(task), str(cfg.get("action")))
        return handler(cfg, repo_root)
    except RunnerError as err:
        logger.error("%s", err)
        return 1
