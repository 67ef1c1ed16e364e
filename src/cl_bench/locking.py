"""One process per run: an advisory ``flock`` on ``<results_dir>/locks/<run_id>.lock``.

Two ``cl-bench bench`` processes (or a bench and a ``run``) on the same suite never train the same
run at once: the second finds the lock held and is told so. The lock dies with its process (even on
``kill -9``), so a crashed run is never left locked. Works on local disks and on NFSv4 shares, where
Linux maps ``flock`` onto byte-range locks. A lock file stays once its run has written something
(removing a lock file that others may wait on would let two of them in); a run that fails before
writing anything removes it and any folder that leaves empty, so bad input writes nothing.
"""
from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from cl_bench.errors import UserError


class RunBusy(UserError):
    """Another process holds the run's lock."""


@contextmanager
def run_lock(results_dir: str | Path, run_id: str, *, wait: bool = False):
    """Hold the lock of ``run_id`` for the duration; ``wait=False`` raises RunBusy when it is taken."""
    path = Path(results_dir) / "locks" / f"{run_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(descriptor)
        holder = path.read_text().strip() or "another process"
        raise RunBusy(f"run {run_id} is already being run by {holder} (its lock is released when that "
                      f"process ends)") from None
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        if not (Path(results_dir) / "runs" / run_id).exists():
            _remove_unused(path)  # the run failed before writing anything (bad input): leave no trace
        os.close(descriptor)  # closing releases the lock


def _remove_unused(lock: Path) -> None:
    """Remove the lock file, then the locks folder and the results folder if that leaves them empty."""
    for remove in (lock.unlink, lock.parent.rmdir, lock.parent.parent.rmdir):
        try:
            remove()
        except OSError:
            return
