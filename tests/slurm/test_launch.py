"""megatron_eaft.launch: rank and rendezvous resolution under srun, torchrun and locally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_eaft.launch import (
    LaunchEnv,
    LaunchEnvError,
    die_with_launcher,
    parse_nodelist,
    resolve_launch_env,
    setup_launch_env,
)
from tests.processes import running

REPO = Path(__file__).resolve().parents[2]

# What srun exports to task 11 of a 4-node x 8-GPU job step.
SRUN_TASK_11 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_NTASKS": "32",
    "SLURM_STEP_NUM_TASKS": "32",
    "SLURM_JOB_NODELIST": "gpu-[01-04]",
    "SLURM_STEP_NODELIST": "gpu-[01-04]",
}


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu-[01-04,07],login1", ["gpu-01", "gpu-02", "gpu-03", "gpu-04", "gpu-07", "login1"]),
        ("a[8-11]", ["a8", "a9", "a10", "a11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-gpu[1,3]", ["rack1-gpu1", "rack1-gpu3", "rack2-gpu1", "rack2-gpu3"]),
        ("x[3]y,z", ["x3y", "z"]),
        (" gpu-[2-3] ", ["gpu-2", "gpu-3"]),
    ],
)
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "message"),
    [
        ("gpu-[01-04", "unbalanced '\\['"),
        ("gpu-01]", "unbalanced '\\]'"),
        ("gpu-[[1]]", "nested brackets"),
        ("gpu-[4-1]", "descending range"),
        ("gpu-[a-b]", "bad range"),
        ("gpu-[1,]", "bad range"),
        ("a,,b", "empty host name"),
        ("", "empty host name"),
    ],
)
def test_parse_nodelist_errors(nodelist, message):
    with pytest.raises(LaunchEnvError, match=message):
        parse_nodelist(nodelist)


def test_srun_task():
    resolved = resolve_launch_env(SRUN_TASK_11)
    assert resolved == LaunchEnv(
        rank=11,
        world_size=32,
        local_rank=3,
        master_addr="gpu-01",
        master_port=10000 + 4242 % 20000,
        source="slurm",
    )
    assert not resolved.is_main


def test_srun_prefers_the_step_over_the_job():
    # A step on 2 of the job's 4 nodes: the step's task count and first node are the ones.
    environ = {
        **SRUN_TASK_11,
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_STEP_NODELIST": "gpu-[03-04]",
    }
    resolved = resolve_launch_env(environ)
    assert (resolved.world_size, resolved.master_addr) == (16, "gpu-03")


def test_srun_with_only_the_job_variables():
    environ = {k: v for k, v in SRUN_TASK_11.items() if not k.startswith("SLURM_STEP_N")}
    resolved = resolve_launch_env(environ)
    assert (resolved.rank, resolved.world_size, resolved.master_addr) == (11, 32, "gpu-01")


def test_ports_differ_between_jobs():
    ports = {
        resolve_launch_env({**SRUN_TASK_11, "SLURM_JOB_ID": str(job)}).master_port
        for job in range(100, 110)
    }
    assert len(ports) == 10 and all(10000 <= port < 30000 for port in ports)


def test_torchrun_variables_win():
    environ = {
        **SRUN_TASK_11,  # torchrun started by one srun task per node
        "RANK": "5",
        "WORLD_SIZE": "32",
        "LOCAL_RANK": "5",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
    }
    assert resolve_launch_env(environ) == LaunchEnv(5, 32, 5, "10.0.0.1", 29400, "torchrun")


def test_exported_address_overrides_slurm_one_variable_at_a_time():
    resolved = resolve_launch_env({**SRUN_TASK_11, "MASTER_PORT": "23456"})
    assert (resolved.source, resolved.master_addr, resolved.master_port) == (
        "slurm",
        "gpu-01",
        23456,
    )


def test_local_defaults():
    assert resolve_launch_env({}) == LaunchEnv(0, 1, 0, "127.0.0.1", 29500, "local")


def test_sbatch_script_itself_is_a_single_process():
    # The batch step has SLURM_PROCID=0 and the job's task count but no SLURM_STEP_ID.
    environ = {k: v for k, v in SRUN_TASK_11.items() if not k.startswith("SLURM_STEP")}
    environ["SLURM_PROCID"] = "0"
    environ["SLURM_LOCALID"] = "0"
    with pytest.warns(UserWarning, match="start one task per GPU with srun"):
        resolved = resolve_launch_env(environ)
    assert (resolved.source, resolved.world_size) == ("local", 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"SLURM_PROCID": "40"},
            r"SLURM_PROCID=40 is outside \[0, 32\) given by SLURM_STEP_NUM_TASKS=32",
        ),
        ({"SLURM_PROCID": "-1"}, "SLURM_PROCID=-1 is outside"),
        (
            {"SLURM_STEP_NUM_TASKS": "0"},
            "SLURM_STEP_NUM_TASKS=0: the world size must be at least 1",
        ),
        ({"SLURM_LOCALID": "32"}, "SLURM_LOCALID=32 is outside"),
        ({"SLURM_PROCID": "eleven"}, "SLURM_PROCID='eleven' is not an integer"),
        ({"SLURM_JOB_NODELIST": "gpu-[01-04", "SLURM_STEP_NODELIST": ""}, "unbalanced"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a valid TCP port"),
    ],
)
def test_inconsistent_slurm_environment(overrides, message):
    with pytest.raises(LaunchEnvError, match=message):
        resolve_launch_env({**SRUN_TASK_11, **overrides})


def test_brief_example_ntasks_16_procid_20():
    environ = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16"}
    environ |= {"SLURM_PROCID": "20", "SLURM_LOCALID": "4", "SLURM_JOB_NODELIST": "n[1-2]"}
    with pytest.raises(LaunchEnvError, match=r"SLURM_PROCID=20 is outside \[0, 16\)"):
        resolve_launch_env(environ)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK=2 is outside \[0, 2\)"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK is not set"),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1"},
            "no master address",
        ),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"},
            "no port",
        ),
        ({"LOCAL_RANK": "3"}, "LOCAL_RANK=3 is outside"),
    ],
)
def test_inconsistent_torchrun_environment(environ, message):
    with pytest.raises(LaunchEnvError, match=message):
        resolve_launch_env(environ)


def test_setup_exports_for_env_init():
    environ = dict(SRUN_TASK_11)
    resolved = setup_launch_env(environ=environ)
    assert {
        k: environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    } == {
        "MASTER_ADDR": "gpu-01",
        "MASTER_PORT": str(resolved.master_port),
        "RANK": "11",
        "WORLD_SIZE": "32",
        "LOCAL_RANK": "3",
    }
    # Once exported, resolving again is stable (the torchrun variables now win, same values).
    assert resolve_launch_env(environ) == LaunchEnv(**{**resolved.__dict__, "source": "torchrun"})
    untouched = dict(SRUN_TASK_11)
    setup_launch_env(export=False, environ=untouched)
    assert untouched == SRUN_TASK_11


def test_env_init_with_torch_distributed():
    """The exported variables are all torch.distributed's env:// rendezvous needs."""
    import os
    import subprocess
    import sys

    code = (
        "import os, socket, torch.distributed as dist\n"
        "from megatron_eaft.launch import setup_launch_env\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "os.environ.update(SLURM_JOB_ID='1', SLURM_STEP_ID='0', SLURM_PROCID='0',"
        " SLURM_LOCALID='0', SLURM_NTASKS='1', SLURM_JOB_NODELIST='localhost', MASTER_PORT=str(port))\n"
        "env = setup_launch_env()\n"
        "dist.init_process_group('gloo')\n"
        "print(dist.get_rank(), dist.get_world_size(), env.source)\n"
        "dist.destroy_process_group()\n"
    )
    launcher_variables = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in launcher_variables and not k.startswith("SLURM_")
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environ,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1", "slurm"]


# --- dying with the launcher -----------------------------------------------------------------

# A stand-in for torchrun's agent: starts one worker in its own session (as torchrun does),
# prints its pid, and waits. The worker calls die_with_launcher, says so and sleeps.
_LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
print(worker.pid, flush=True)
time.sleep(600)
"""
_WORKER = """
import time
from megatron_eaft.launch import die_with_launcher
assert die_with_launcher(parent_death_signal={pdeathsig}, interval={interval})
print("armed", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")
# Each mechanism alone: the kernel's death signal with a watchdog too slow to matter, the
# watchdog without the death signal.
@pytest.mark.parametrize(
    ("pdeathsig", "interval"), [(True, 600), (False, 0.1)], ids=["prctl", "watchdog"]
)
def test_worker_dies_with_a_killed_launcher(pdeathsig, interval):
    environ = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, _WORKER.format(pdeathsig=pdeathsig, interval=interval)],
        env=environ,
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = int(launcher.stdout.readline())
    try:
        assert launcher.stdout.readline().strip() == "armed"  # the worker's own line
        assert running(worker)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 5
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(worker), "the worker outlived its launcher"
    finally:
        if running(worker):
            os.kill(worker, signal.SIGKILL)


def test_die_with_launcher_only_under_torchrun():
    # A local process's parent is the user's shell, which may exit first (nohup).
    assert not die_with_launcher({"RANK": "0", "WORLD_SIZE": "1"})
