"""Environment, hook commands and the foreground exec for the server. No shell is ever used.

``experiment.envs`` values become strings: booleans as ``true``/``false`` (FlagScale convention),
numbers via ``str``; an empty string is exported as empty (``CUDA_VISIBLE_DEVICES: ""`` hides every
GPU, exactly as ``export CUDA_VISIBLE_DEVICES=`` would); ``null`` removes the variable from the
inherited environment. Lists and maps are refused.

``experiment.cmds.before_start`` / ``after_stop``: a list whose items are argv lists
(``[echo, hi]``) or strings split with ``shlex.split`` (``"echo hi"``); a single string is one
command. They run without a shell, so shell syntax (``&&``, ``|``, ``>``, ``$VAR``) and builtins
(``source``, ``export``, ``cd``) are refused with a message.
"""

import os
import shlex
import subprocess
import sys

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from flagscale.logger import get_logger
from flagscale.runner.process import remove_pid_record, write_pid_record
from flagscale.runner.runner_base import RunnerError

logger = get_logger("flagscale.runner")

SHELL_BUILTINS = {"source", ".", "export", "unset", "cd", "set", "alias", "eval", "exec"}


def env_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise RunnerError(
        f"experiment.envs.{key}: expected a string, number or boolean, got {type(value).__name__}"
    )


def build_env(envs: Mapping[str, Any], base: Mapping[str, str], repo_root: Path) -> Dict[str, str]:
    """``base`` + ``envs`` (see module doc); the repo root is put first on PYTHONPATH."""
    env = dict(base)
    for key, value in (envs or {}).items():
        if value is None:
            env.pop(str(key), None)
        else:
            env[str(key)] = env_value(str(key), value)
    paths = [str(repo_root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def parse_cmds(value: Any, name: str) -> List[List[str]]:
    """``experiment.cmds.<name>`` → list of argv lists (see module doc)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise RunnerError(f"experiment.cmds.{name}: expected a list of commands, got {value!r}")
    return [parse_argv(item, f"experiment.cmds.{name}[{i}]") for i, item in enumerate(items)]


def parse_argv(item: Any, where: str) -> List[str]:
    if isinstance(item, str):
        argv = shlex.split(item)
        shellish = _shell_syntax(item)
        if shellish:
            raise RunnerError(
                f"{where}: {item!r} uses shell syntax {shellish}; commands run without a shell. "
                "Give one command per list item (argv list or plain string); put variables in "
                "experiment.envs"
            )
    elif isinstance(item, (list, tuple)) and all(isinstance(a, (str, int, float)) for a in item):
        argv = [str(a) for a in item]
    else:
        raise RunnerError(f"{where}: expected a string or a list of strings, got {item!r}")
    if not argv:
        raise RunnerError(f"{where}: empty command")
    if argv[0] in SHELL_BUILTINS:
        raise RunnerError(
            f"{where}: {argv[0]!r} is a shell builtin and commands run without a shell; "
            "activate environments before calling run.py and set variables in experiment.envs"
        )
    return argv


def _shell_syntax(text: str) -> List[str]:
    """Operators (``;``, ``&&``, ``|``, ``>``...) and expansions (``$``, backquote) in ``text``.

    Quoted operator characters are reported too: give such arguments as an argv list instead.
    """
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found = [t for t in tokens if t and set(t) <= set(lexer.punctuation_chars)]
    return found + [t for t in tokens if "$" in t or "`" in t]


def run_cmds(cmds: Sequence[List[str]], name: str, cwd: Path, env: Mapping[str, str]) -> None:
    for argv in cmds:
        logger.info("experiment.cmds.%s: %s", name, shlex.join(argv))
        try:
            result = subprocess.run(list(argv), cwd=str(cwd), env=dict(env), check=False)
        except OSError as err:
            raise RunnerError(f"experiment.cmds.{name}: cannot run {argv[0]!r}: {err}") from err
        if result.returncode != 0:
            raise RunnerError(
                f"experiment.cmds.{name}: {shlex.join(argv)} exited with {result.returncode}"
            )


def exec_foreground(argv: Sequence[str], cwd: Path, env: Mapping[str, str], pid_file: Path):
    """Replace this process with the server (same pid, logs on this stdout). Never returns.

    The pid record is written first: exec keeps pid and create time, so ``action=stop`` works.
    """
    os.chdir(cwd)
    write_pid_record(pid_file, os.getpid())
    logger.info("exec (foreground): %s", shlex.join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], list(argv), dict(env))
    except OSError as err:
        remove_pid_record(pid_file)
        raise RunnerError(f"cannot exec {argv[0]}: {err}") from err
