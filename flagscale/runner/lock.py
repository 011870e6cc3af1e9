"""One launcher action at a time per exp_dir: an advisory lock on a file in it (fcntl.flock).

Held while `run` checks for a running server and starts one (until its pid is recorded) and
during `stop`; a second `run` for the same exp_dir waits for it, then finds the recorded server.
The lock is released when the process exits, whatever happens (it is not inherited by the
server: Python opens files close-on-exec).
"""

import contextlib
import fcntl
import os
import time

from pathlib import Path

from flagscale.runner.runner_base import RunnerError

LOCK_WAIT_S = 60.0


@contextlib.contextmanager
def exp_dir_lock(path: Path, exp_dir: Path, wait_s: float | None = None):
    fd = _open(path, exp_dir)
    try:
        _acquire(fd, path, exp_dir, LOCK_WAIT_S if wait_s is None else wait_s)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open(path: Path, exp_dir: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise RunnerError(
            f"experiment.exp_dir: cannot write under {exp_dir}: {err.strerror or err} "
            f"({err.filename or path}); choose a writable experiment.exp_dir"
        ) from None


def _acquire(fd: int, path: Path, exp_dir: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise RunnerError(
                    f"another run.py action for exp_dir {exp_dir} has held {path} for "
                    f"{wait_s:.0f}s; wait for it to finish, or use another experiment.exp_dir"
                ) from None
            time.sleep(0.1)
