"""Run a function on N gloo ranks on this machine and collect what each rank returns.

Used by the tests, the benchmarks and the CPU demo. Workers are long-lived: importing
``megatron.core`` costs several seconds per process, so a :class:`WorkerPool` imports it once
per worker and then serves any number of jobs, each in a fresh process group on a fresh port.

A job is ``fn(*args, **kwargs)`` on ranks ``0..world_size-1``; ``fn`` must be importable by
module path (a top-level function) and return something picklable. If any rank raises, the
call raises :class:`RankError` carrying that rank's traceback; ranks left waiting in a
collective (or stuck tearing one down) are killed and replaced, so one failing job does not
poison the next, and ranks that came back cleanly are kept.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

DEFAULT_TIMEOUT_S = 300.0
_STARTUP_TIMEOUT_S = 600.0
# After one rank fails, how long the others get to notice before they are killed.
_FAILURE_GRACE_S = 10.0
# A job can leave its process groups alive after teardown (Megatron's DDP + optimizer as built
# by the trainer do: ~60 gloo threads per run, measured), and each idle gloo thread wakes up
# regularly (~0.3 s of CPU per 10 s per 60 threads, measured): a worker past this many threads
# is replaced after its job rather than slowing every later one.
RETIRE_ABOVE_THREADS = 250
# How long a rank that raised gets to tear its process group down before it is replaced.
_TEARDOWN_GRACE_S = 10.0


class RankError(RuntimeError):
    """A rank raised inside a distributed job; the message holds its traceback."""

    def __init__(self, rank: int, remote_traceback: str, exception: BaseException | None):
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.exception = exception
        super().__init__(f"rank {rank} failed:\n{remote_traceback}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_job(job: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    torch.distributed.init_process_group(
        backend="gloo",
        init_method=f"tcp://127.0.0.1:{job['port']}",
        rank=job["rank"],
        world_size=job["world_size"],
        timeout=datetime.timedelta(seconds=job["timeout"]),
    )


def _thread_count() -> int:
    """Threads of this process (Linux; 0 where /proc is unavailable)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _reports_idle(conn: Connection) -> bool:
    """Whether a worker that reported an error has since torn its job down."""
    try:
        return conn.poll(_TEARDOWN_GRACE_S) and conn.recv()[0] == "idle"
    except (EOFError, OSError):
        return False


def _round_trips(exc: BaseException) -> BaseException | None:
    """`exc` if it survives pickling both ways, else None: an exception that pickles but does
    not unpickle (a custom __init__ without __reduce__) would fail in the parent's recv."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc


def _end_job() -> None:
    import torch

    # Only a job that imported megatron can have model-parallel state to destroy; a pool
    # without megatron preloaded should not pay its import here.
    if "megatron.core.parallel_state" in sys.modules:
        from megatron_eaft.megatron import cpu_runtime

        cpu_runtime.destroy_parallel()
    torch.distributed.destroy_process_group()


def _worker_main(conn: Connection, preload: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Megatron warns about every missing GPU library on import; on CPU that is expected.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if preload:
        import megatron.core  # noqa: F401  (the expensive import, paid once per worker)

        from megatron_eaft.megatron import cpu_runtime

        cpu_runtime.apply_cpu_patches()
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            _init_job(job)
            result = job["fn"](*job["args"], **job["kwargs"])
        except BaseException as exc:
            # Report before tearing down: teardown can block while peers sit in a
            # collective, and then the parent replaces this worker.
            conn.send(("error", traceback.format_exc(), _round_trips(exc)))
            _end_job()
            # Torn down cleanly: the parent may keep this worker (and its imports).
            conn.send(("idle", None))
            continue
        _end_job()
        try:
            conn.send(("ok", result, _thread_count() > RETIRE_ABOVE_THREADS))
        except Exception as exc:  # an unpicklable result is the job's bug, not the pool's
            conn.send(
                ("error", f"rank {job['rank']} returned an unpicklable result: {exc!r}", None)
            )


class WorkerPool:
    """A fixed set of worker processes that run distributed jobs on demand."""

    def __init__(self, size: int, preload_megatron: bool = True):
        if size < 1:
            raise ValueError(f"WorkerPool size must be >= 1, got {size}")
        self._context = mp.get_context("spawn")
        self._preload = preload_megatron
        self._workers: list[tuple[mp.process.BaseProcess, Connection] | None] = [None] * size

    @property
    def size(self) -> int:
        return len(self._workers)

    def _start(self, slots: range) -> None:
        """Start the missing workers of ``slots`` together (their imports overlap), then wait
        until each has imported megatron: job timeouts should not include that."""
        starting = []
        for slot in slots:
            entry = self._workers[slot]
            if entry is not None and entry[0].is_alive():
                continue
            parent_conn, child_conn = self._context.Pipe()
            process = self._context.Process(
                # Not daemonic: Megatron's checkpoint writer starts its own helper processes.
                target=_worker_main,
                args=(child_conn, self._preload),
                daemon=False,
            )
            process.start()
            child_conn.close()
            self._workers[slot] = (process, parent_conn)
            starting.append(slot)
        for slot in starting:
            process, conn = self._workers[slot]  # type: ignore[misc]
            ready = conn.poll(_STARTUP_TIMEOUT_S)
            try:
                ready = ready and conn.recv()[0] == "ready"
            except (EOFError, OSError):
                ready = False
            if not ready:
                self._kill(slot)
                raise RuntimeError(f"worker {slot} failed to start (exit code {process.exitcode})")

    def warm_up(self) -> None:
        self._start(range(self.size))

    def restart(self) -> None:
        """Replace every worker by a new process, so that the next job starts from a clean
        interpreter, as a run launched on its own does (no module-level state, process groups
        or threads left by earlier jobs)."""
        self.close()
        self._start(range(self.size))

    def _retire(self, slot: int) -> None:
        """Stop a healthy worker (the next job that needs its slot starts a fresh one)."""
        entry = self._workers[slot]
        if entry is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                entry[1].send(None)
            entry[0].join(timeout=1)
        self._kill(slot)

    def _kill(self, slot: int) -> None:
        entry = self._workers[slot]
        if entry is not None:
            entry[0].kill()
            entry[0].join(timeout=5)
            entry[1].close()
        self._workers[slot] = None

    def run(
        self,
        fn: Callable[..., Any],
        world_size: int,
        *args: Any,
        timeout: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> list[Any]:
        if not 1 <= world_size <= self.size:
            raise ValueError(f"world_size {world_size} needs 1..{self.size} workers")
        port = _free_port()
        threads = max(1, (os.cpu_count() or 1) // world_size)
        conns: dict[Connection, int] = {}
        self._start(range(world_size))
        for rank in range(world_size):
            _, conn = self._workers[rank]  # type: ignore[misc]
            conn.send(
                {
                    "fn": fn,
                    "args": args,
                    "kwargs": kwargs,
                    "rank": rank,
                    "world_size": world_size,
                    "port": port,
                    "timeout": timeout,
                    "threads": threads,
                }
            )
            conns[conn] = rank
        results: list[Any] = [None] * world_size
        failure: RankError | None = None
        errored: set[int] = set()
        retiring: list[int] = []
        deadline = time.monotonic() + timeout
        pending = dict(conns)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(pending), timeout=remaining):
                rank = pending.pop(conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = ("error", f"rank {rank}: worker process died", None)
                if message[0] == "ok":
                    results[rank] = message[1]
                    if message[2]:
                        retiring.append(rank)
                    continue
                errored.add(rank)
                if failure is None:
                    failure = RankError(rank, message[1], message[2])
                    deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
        if failure is not None:
            # Ranks still in the job may sit in a collective, and a rank that raised may hang
            # in process-group teardown: replace those, keep the ranks that came back clean
            # (re-importing megatron costs seconds per worker).
            for conn, rank in conns.items():
                if conn in pending or (rank in errored and not _reports_idle(conn)):
                    self._kill(rank)
            raise failure
        for rank in retiring:
            self._retire(rank)
        if pending:
            for rank in range(world_size):
                self._kill(rank)
            raise TimeoutError(
                f"distributed job {fn.__module__}.{fn.__qualname__} did not finish on ranks "
                f"{sorted(pending.values())} within {timeout:.0f} s"
            )
        return results

    def close(self) -> None:
        # Workers hold no state worth a clean interpreter shutdown (which costs seconds with
        # megatron imported): ask them to stop, then make sure they have.
        for entry in self._workers:
            if entry is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    entry[1].send(None)
        for slot in range(self.size):
            entry = self._workers[slot]
            if entry is not None:
                entry[0].join(timeout=1)
                self._kill(slot)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> list[Any]:
    """Spawn ``world_size`` gloo ranks on 127.0.0.1, run ``fn`` on each, return their results."""
    with WorkerPool(world_size) as pool:
        return pool.run(fn, world_size, *args, timeout=timeout, **kwargs)
