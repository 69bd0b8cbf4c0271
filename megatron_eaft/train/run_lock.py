"""One run per save directory: an exclusive lock held by rank 0 for the whole run.

Two runs writing into one ``checkpoint.save`` interleave their metrics and checkpoints until
one removes the other's save in progress. Rank 0 of every run therefore takes an exclusive
``flock`` on ``<save>/.megatron_eaft.lock`` before the expensive start-up and holds it until it
exits; the file records who holds it (host, pid, start time), so a second run stops at once
naming the holder. Rank 0 rather than the launcher: under srun there is no launcher process of
ours, and with one torchrun per node each would hold its own lock.

Stale locks: the kernel drops a flock when its holder dies (kill -9 included), so nothing needs
cleaning up. On NFS (Linux emulates flock with POSIX locks there), a lock held by a host that
crashed stays until the server's lease runs out (about 90 s for NFSv4); Lustre supports flock
across nodes only when mounted with ``-o flock`` (``-o localflock`` locks per node only). Where
the filesystem refuses locks the run goes on with a warning: nothing then stops a second run.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

LOCK_FILE = ".megatron_eaft.lock"

logger = logging.getLogger(__name__)

# flock on a filesystem without lock support (Lustre without -o flock, some FUSE mounts).
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockError(RuntimeError):
    """Another run holds the save directory."""


class RunLock:
    """The held lock; released by :meth:`release` or when this process exits."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    """'host H, pid P, since T' from the lock file, or what is known when it is unreadable."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"host {record['host']}, pid {record['pid']}, since {record['started']}"
    return "a run that has not recorded itself yet"


def acquire_run_lock(save_dir: str | os.PathLike) -> RunLock:
    """Lock `save_dir` for this process (creating it) or raise RunLockError naming the holder."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / LOCK_FILE
    # Not O_TRUNC: the holder's record must survive a failed attempt. O_CLOEXEC (Python's
    # default) keeps the lock out of programs this process runs; forked children share it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunLockError(
            f"{save_dir} is in use by another run ({holder}; lock file {path}). Two runs on "
            "one checkpoint.save would overwrite each other's checkpoints: wait for it, stop "
            "it, or give this run another checkpoint.save"
        ) from None
    except OSError as error:
        os.close(fd)
        if error.errno not in _UNSUPPORTED:
            raise
        logger.warning(
            "cannot lock %s (%s): the filesystem does not support flock (Lustre needs "
            "-o flock), so nothing stops a second run on this checkpoint.save",
            path,
            os.strerror(error.errno),
        )
        return RunLock(path, None)
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    os.fsync(fd)
    return RunLock(path, fd)
