"""Server process bookkeeping: start, pid record (pid + create time), stop our own tree only.

The pid file holds just the pid (FlagScale layout); ``<pid file>.json`` beside it holds the pid and
the process create time. A pid is only ever signalled when both files agree and the live process
has the recorded create time, so a recycled pid or a foreign process is never killed.
"""

import json
import os
import signal
import subprocess
import time

from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

import psutil

from flagscale.logger import get_logger

logger = get_logger("flagscale.runner")

# psutil derives create_time from the boot time, which the kernel reports in whole seconds
# and which may shift by one when the wall clock is stepped: compare with this tolerance.
CREATE_TIME_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class PidRecord:
    pid: int
    create_time: float


def meta_path(pid_file: Path) -> Path:
    return pid_file.with_name(pid_file.name + ".json")


def write_pid_record(pid_file: Path, pid: int) -> PidRecord:
    """Record ``pid`` (which must be alive) with its create time; meta first, pid file last."""
    record = PidRecord(pid, psutil.Process(pid).create_time())
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(meta_path(pid_file), json.dumps(record.__dict__) + "\n")
    _write_atomic(pid_file, f"{pid}\n")
    return record


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_pid_record(pid_file: Path) -> Optional[PidRecord]:
    """The record, or None when there is no pid file. Unverifiable files give create_time -1."""
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        return PidRecord(-1, -1.0)
    try:
        meta = json.loads(meta_path(pid_file).read_text())
        if int(meta["pid"]) == pid:
            return PidRecord(pid, float(meta["create_time"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return PidRecord(pid, -1.0)


def remove_pid_record(pid_file: Path) -> None:
    for path in (pid_file, meta_path(pid_file)):
        path.unlink(missing_ok=True)


def live_process(record: PidRecord) -> Optional[psutil.Process]:
    """The recorded process if it still runs and is the one we started, else None."""
    if record.pid <= 0 or record.create_time < 0:
        return None
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        return None if _gone(proc) else proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def process_tree(leader: psutil.Process) -> List[psutil.Process]:
    """The leader, its descendants, and (if it leads a session) orphans left in its session."""
    procs = {leader.pid: leader}
    try:
        procs.update((child.pid, child) for child in leader.children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    if _leads_session(leader):
        since = leader.create_time()
        procs.update((p.pid, p) for p in session_members(leader.pid, since) if p.pid not in procs)
    return list(procs.values())


def _leads_session(proc: psutil.Process) -> bool:
    try:
        return os.getsid(proc.pid) == proc.pid
    except OSError:
        return False


def session_members(sid: int, since: float) -> List[psutil.Process]:
    """Live processes of session ``sid`` created at or after ``since`` (never this process)."""
    members = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if os.getsid(proc.pid) == sid and proc.create_time() >= since - CREATE_TIME_TOLERANCE_S:
                members.append(proc)
        except (OSError, psutil.Error):
            pass
    return members


def session_orphans(record: PidRecord) -> List[psutil.Process]:
    """Processes left in the session of a recorded leader that has exited.

    Only while the leader's pid is free: if the pid was reused (possibly by a new session leader
    with the same session id), nothing is returned, so no foreign process is ever signalled.
    """
    if record.pid <= 0 or record.create_time < 0 or psutil.pid_exists(record.pid):
        return []
    return session_members(record.pid, record.create_time)


def stop_tree(
    leader: psutil.Process, timeout: float
) -> Tuple[List[psutil.Process], List[psutil.Process]]:
    """Stop ``process_tree(leader)``, the leader first: a driver (Ray Serve) shuts down what it
    started while those processes still run; then the rest. Returns (processes hit, survivors)."""
    procs = process_tree(leader)
    deadline = time.monotonic() + timeout
    _signal_all([leader], signal.SIGTERM)
    wait_gone([leader], timeout)
    return procs, stop_procs(procs, max(LAST_GRACE_S, deadline - time.monotonic()))


LAST_GRACE_S = 2.0  # SIGTERM -> SIGKILL for what the leader left behind after its own wait


def stop_procs(procs: Sequence[psutil.Process], timeout: float) -> List[psutil.Process]:
    """SIGTERM, wait up to ``timeout`` s, SIGKILL survivors. Returns what still runs."""
    _signal_all(procs, signal.SIGTERM)
    survivors = wait_gone(procs, timeout)
    if survivors:
        logger.warning(
            "still running after %.0fs, sending SIGKILL: %s", timeout, [p.pid for p in survivors]
        )
        _signal_all(survivors, signal.SIGKILL)
        survivors = wait_gone(survivors, 5.0)
    return survivors


def _signal_all(procs: Sequence[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil refuses if the pid was reused meanwhile
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> List[psutil.Process]:
    """Wait until every process exited (zombies count as exited); return the survivors."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive:
        alive = [p for p in alive if not _gone(p)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return alive


def start_background(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], log_path: Path
) -> subprocess.Popen:
    """Start ``argv`` in its own session, stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n===== {stamp} starting: {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(argv),
            cwd=str(cwd),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def exit_status(proc: subprocess.Popen) -> Optional[int]:
    """The child's exit code (negative: killed by that signal) once it exited, else None.

    Unlike ``Popen.poll`` this does not reap it: the zombie keeps its pid (and so its session id)
    reserved until the caller has stopped what it left behind and calls ``wait``.
    """
    if proc.returncode is not None:
        return proc.returncode
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def tail(path: Path, lines: int = 40, start: int = 0, skip=None) -> List[str]:
    """Last ``lines`` non-empty lines of a text file after byte offset ``start`` (at most the last
    64 KiB), leaving out those for which ``skip(line)`` is true."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 65536))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    kept = [line for line in data.splitlines() if line.strip() and not (skip and skip(line))]
    return kept[-lines:]


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
