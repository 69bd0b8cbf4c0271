"""Rank, world size and rendezvous address from the launcher's environment.

The same training command runs unchanged

* under ``srun`` with one task per GPU: ranks from ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
  ``SLURM_LOCALID``, the master is the first host of the step's node list and the port is
  derived from ``SLURM_JOB_ID`` (so concurrent jobs on shared nodes do not collide);
* under ``torchrun`` (or anything exporting ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
  ``MASTER_ADDR`` / ``MASTER_PORT``): those variables win, one by one, over SLURM's;
* locally: a single process on 127.0.0.1.

`setup_launch_env()` resolves and exports ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` so that ``torch.distributed.init_process_group`` with the
default ``env://`` init method works. No torch or Megatron import: this runs before them.

`die_with_launcher()` ties a torchrun worker's life to the agent that started it: torchrun puts
each worker in its own session, so a ``kill -9`` of torchrun would otherwise leave them training.

Run ``python -m megatron_eaft.launch`` (e.g. under ``srun``) to print what each task resolves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass
from typing import Literal

LaunchSource = Literal["torchrun", "slurm", "local"]

logger = logging.getLogger(__name__)

LOCAL_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Ports derived from the job id land in [10000, 30000): below Linux's ephemeral range
# (32768-60999), so an outgoing connection never holds the rendezvous port.
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or contradicts itself."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: LaunchSource

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --- SLURM node lists -----------------------------------------------------------------------


def _split_top_level(text: str, separator: str = ",") -> list[str]:
    """Splits on `separator` outside brackets; checks the brackets balance."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
            if depth > 1:
                raise LaunchEnvError(f"nested brackets in node list {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"unbalanced ']' in node list {text!r}")
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise LaunchEnvError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(current))
    return parts


def _expand_range_list(ranges: str, nodelist: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"], keeping the zero padding of each range."""
    values = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if match is None:
            raise LaunchEnvError(f"bad range {item!r} in node list {nodelist!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise LaunchEnvError(f"descending range {item!r} in node list {nodelist!r}")
        width = len(first)
        values.extend(str(number).zfill(width) for number in range(int(first), int(last) + 1))
    return values


def _expand_host_pattern(pattern: str, nodelist: str) -> list[str]:
    """ "rack[1-2]-gpu[01-02]" -> every combination, in Slurm's order."""
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [
        head + value + rest
        for value in _expand_range_list(match.group(1), nodelist)
        for rest in _expand_host_pattern(tail, nodelist)
    ]


def parse_nodelist(nodelist: str) -> list[str]:
    """Expands a Slurm host list such as ``gpu-[01-04,07],login1`` into host names."""
    hosts = []
    for pattern in _split_top_level(nodelist.strip()):
        pattern = pattern.strip()
        if not pattern:
            raise LaunchEnvError(f"empty host name in node list {nodelist!r}")
        hosts.extend(_expand_host_pattern(pattern, nodelist))
    return hosts


# --- resolution -----------------------------------------------------------------------------


def _int_variable(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not an integer") from None


def _first_int(environ: Mapping[str, str], *names: str) -> tuple[int, str] | None:
    for name in names:
        value = _int_variable(environ, name)
        if value is not None:
            return value, name
    return None


def _in_slurm_batch_script(environ: Mapping[str, str]) -> bool:
    # sbatch runs the script itself as one process with SLURM_PROCID=0 and the job's
    # SLURM_NTASKS; only srun steps carry SLURM_STEP_ID.
    return "SLURM_JOB_ID" in environ and not (
        "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    )


def _ranks(environ: Mapping[str, str]) -> tuple[LaunchSource, int, int, str, str]:
    """(source, rank, world size, rank variable, world-size variable)."""
    rank, world = _int_variable(environ, "RANK"), _int_variable(environ, "WORLD_SIZE")
    if rank is not None and world is not None:
        return "torchrun", rank, world, "RANK", "WORLD_SIZE"
    if rank is not None or world is not None:
        present, missing = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
        raise LaunchEnvError(f"{present} is set but {missing} is not")
    rank = _int_variable(environ, "SLURM_PROCID")
    # Under srun SLURM_NTASKS is the step's task count too; the STEP variable is the precise one.
    world_and_name = _first_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if rank is None or world_and_name is None:
        return "local", 0, 1, "", ""
    world, world_name = world_and_name
    if _in_slurm_batch_script(environ):
        if world > 1:
            warnings.warn(
                f"running in the sbatch script itself ({world_name}={world}, no srun step): "
                "this is a single process; start one task per GPU with srun",
                stacklevel=3,
            )
        return "local", 0, 1, "", ""
    return "slurm", rank, world, "SLURM_PROCID", world_name


def _local_rank(
    environ: Mapping[str, str], source: LaunchSource, world_size: int
) -> tuple[int, str]:
    names = ("LOCAL_RANK", "SLURM_LOCALID") if source == "slurm" else ("LOCAL_RANK",)
    found = _first_int(environ, *names)
    if found is not None:
        return found
    if world_size > 1:
        raise LaunchEnvError(f"{world_size} processes but {' / '.join(names)} is not set")
    return 0, "LOCAL_RANK"


def _master_addr(environ: Mapping[str, str], source: LaunchSource, world_size: int) -> str:
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    if source == "slurm":
        for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
            if environ.get(name):
                return parse_nodelist(environ[name])[0]
    if world_size > 1:
        raise LaunchEnvError(
            f"{world_size} processes but no master address: set MASTER_ADDR "
            "(under srun, SLURM_JOB_NODELIST provides it)"
        )
    return LOCAL_MASTER_ADDR


def _master_port(environ: Mapping[str, str], source: LaunchSource, world_size: int) -> int:
    port, name = _int_variable(environ, "MASTER_PORT"), "MASTER_PORT"
    if port is None and source == "slurm":
        job_id = _int_variable(environ, "SLURM_JOB_ID")
        if job_id is not None:
            port = SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
    if port is None:
        if world_size > 1:
            raise LaunchEnvError(
                f"{world_size} processes but no port: set MASTER_PORT (under srun, "
                "SLURM_JOB_ID provides it)"
            )
        port = DEFAULT_MASTER_PORT
    if not 1 <= port <= 65535:
        raise LaunchEnvError(f"{name}={port} is not a valid TCP port")
    return port


def resolve_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Works out this process's place in the job; raises LaunchEnvError when inconsistent."""
    environ = os.environ if environ is None else environ
    source, rank, world_size, rank_name, world_name = _ranks(environ)
    if world_size < 1:
        raise LaunchEnvError(f"{world_name}={world_size}: the world size must be at least 1")
    if not 0 <= rank < world_size:
        raise LaunchEnvError(
            f"{rank_name}={rank} is outside [0, {world_size}) given by {world_name}={world_size}"
        )
    local_rank, local_name = _local_rank(environ, source, world_size)
    if not 0 <= local_rank < world_size:
        raise LaunchEnvError(
            f"{local_name}={local_rank} is outside [0, {world_size}) "
            f"(world size {world_size} from {world_name or 'a single local process'})"
        )
    return LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=_master_addr(environ, source, world_size),
        master_port=_master_port(environ, source, world_size),
        source=source,
    )


def export_launch_env(
    launch_env: LaunchEnv, environ: MutableMapping[str, str] | None = None
) -> None:
    """Writes the variables torch.distributed's env:// rendezvous reads."""
    environ = os.environ if environ is None else environ
    environ["MASTER_ADDR"] = launch_env.master_addr
    environ["MASTER_PORT"] = str(launch_env.master_port)
    environ["RANK"] = str(launch_env.rank)
    environ["WORLD_SIZE"] = str(launch_env.world_size)
    environ["LOCAL_RANK"] = str(launch_env.local_rank)


def setup_launch_env(
    export: bool = True, environ: MutableMapping[str, str] | None = None
) -> LaunchEnv:
    """resolve_launch_env, then (by default) export the result for env:// initialisation."""
    environ = os.environ if environ is None else environ
    launch_env = resolve_launch_env(environ)
    if export:
        export_launch_env(launch_env, environ)
    return launch_env


# --- dying with the launcher -----------------------------------------------------------------

# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1
# How often the watchdog looks at the parent pid.
WATCHDOG_INTERVAL_S = 1.0


def _set_parent_death_signal(signum: int) -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `signum` when the parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _kill_self_when_orphaned(parent_pid: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent_pid:
            # SIGKILL, not an exception: a clean shutdown would wait in collectives that the
            # dead launcher's other workers never join.
            logger.error(
                "the launcher (pid %d) is gone: stopping this worker (pid %d)",
                parent_pid,
                os.getpid(),
            )
            os.kill(os.getpid(), signal.SIGKILL)


def die_with_launcher(
    environ: Mapping[str, str] | None = None,
    *,
    parent_death_signal: bool = True,
    interval: float = WATCHDOG_INTERVAL_S,
) -> bool:
    """Under torchrun, make this worker die (SIGKILL) when the torchrun agent dies.

    The kernel's parent-death signal covers the common case at once; a watchdog thread that
    sees the parent pid change covers the rest (non-Linux, a libc without prctl). The death
    signal follows the parent *thread* that started the worker, which in torchrun's agent is
    its main thread, i.e. the agent's whole life. A launcher that died between starting this
    process and this call goes unnoticed: the parent pid is then already init's or a
    subreaper's, which is also what a container's torchrun (pid 1) looks like.

    Only under torchrun (TORCHELASTIC_RUN_ID set), where the parent is the launcher: a local
    process's parent is the user's shell, which may legitimately exit first (nohup), and srun's
    tasks are killed by slurmstepd. Returns whether it installed anything.
    """
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in environ:
        return False
    parent_pid = os.getppid()
    if parent_death_signal:
        _set_parent_death_signal(signal.SIGKILL)
    threading.Thread(
        target=_kill_self_when_orphaned,
        args=(parent_pid, interval),
        name="megatron-eaft-launcher-watchdog",
        daemon=True,
    ).start()
    return True


def main() -> int:
    print(json.dumps(asdict(resolve_launch_env())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
