"""A run's life as the user drives it: a second run on the same save, torchrun killed with -9,
Ctrl-C.

Real processes: `megatron-eaft finetune` under torchrun (two workers), stopped while training.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_eaft.train.checkpointing import latest_iteration
from megatron_eaft.train.run_lock import acquire_run_lock
from megatron_eaft.train.trainer import StopSignals
from tests.processes import children, running
from tests.train import helpers
from tests.train.test_resume import (
    REPO,
    WORLD_SIZE,
    _free_port,
    finetune_command,
    metrics_iterations,
    run_config,
    start,
    wait_for,
)

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_torchrun(
    config: dict, out: Path, entry: str = "torch.distributed.run"
) -> subprocess.Popen:
    """`torchrun --nproc-per-node WORLD_SIZE -m megatron_eaft.cli.main finetune`."""
    finetune = finetune_command(config, out)
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORLD_SIZE))
    # torchrun SIGKILLs workers 30 s after passing a signal on; a loaded CI machine can need
    # longer for the step and the save.
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "300"
    torchrun = [
        sys.executable,
        "-m",
        entry,
        f"--nproc-per-node={WORLD_SIZE}",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
    ]
    return start([*torchrun, *finetune[1:]], env, out / "torchrun.log")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc (Linux)")
@pytest.mark.slow
def test_second_run_is_refused_and_kill_9_of_torchrun_stops_the_workers(
    tiny_checkpoint, packed_dataset, tmp_path
):
    config = run_config(
        tiny_checkpoint, packed_dataset, tmp_path / "run", {"train": {"iterations": 100000}}
    )
    torchrun = launch_torchrun(config, tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    workers: list[int] = []
    try:
        wait_for(lambda: len(metrics_iterations(metrics)) >= 1, [torchrun], 300, "iteration 1")
        workers = children(torchrun.pid)
        assert len(workers) == WORLD_SIZE, workers

        # The same command again, as one local process: refused, naming rank 0 of the first.
        second = subprocess.run(
            finetune_command(config, tmp_path / "second"),
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert f"(host {socket.gethostname()}, pid " in second.stderr
        holder = int(second.stderr.split(", pid ")[1].split(",")[0])
        assert holder in workers
        assert "Traceback" not in second.stderr

        os.kill(torchrun.pid, signal.SIGKILL)
        torchrun.wait()
        deadline = time.monotonic() + 10
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(running, workers)), "the workers outlived torchrun"
        steps = len(metrics_iterations(metrics))
        time.sleep(1.0)
        assert len(metrics_iterations(metrics)) == steps, "training went on after the kill"
        # The killed run's lock went with it.
        acquire_run_lock(config["checkpoint"]["save"]).release()
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc (Linux)")
def test_ctrl_c_under_torchrun_saves_at_the_step_end(tiny_checkpoint, packed_dataset, tmp_path):
    # Ctrl-C reaches torchrun only (its workers sit in their own sessions); torchrun passes
    # SIGINT on to them.
    config = run_config(
        tiny_checkpoint, packed_dataset, tmp_path / "run", {"train": {"iterations": 100000}}
    )
    # megatron_eaft.torchrun: torch elastic's torchrun exits 1 after any signal, whatever its
    # workers did; this one exits 0 when they all stopped cleanly.
    torchrun = launch_torchrun(config, tmp_path / "run", entry="megatron_eaft.torchrun")
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        wait_for(lambda: len(metrics_iterations(metrics)) >= 2, [torchrun], 300, "iteration 2")
        torchrun.send_signal(signal.SIGINT)
        assert torchrun.wait(timeout=120) == 0
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
    log = (tmp_path / "run" / "torchrun.log").read_text()
    stopped = latest_iteration(tmp_path / "run" / "checkpoints")
    assert isinstance(stopped, int) and stopped >= 2
    assert f"SIGINT: stopped after iteration {stopped} (checkpoint saved)" in log
    assert sorted(metrics_iterations(metrics)) == list(range(1, stopped + 1))
    assert "KeyboardInterrupt" not in log
    assert "forcefully exiting" not in log  # every worker was done before torchrun's timeout
    assert "ChildFailedError" not in log  # ... and exited 0
    assert "SIGINT: every worker stopped cleanly (exit 0)" in log


def test_stop_signals_remember_the_first_and_arm_a_second_ctrl_c():
    # What was there before comes back: Python's Ctrl-C handler, or SIG_IGN where the shell
    # started the tests in the background (a non-interactive shell's `cmd &` ignores SIGINT).
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGTERM"
        # The next Ctrl-C takes SIGINT's default action: the process stops, whatever it is in.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert {sig: signal.getsignal(sig) for sig in before} == before


def fit_after_an_early_signal(checkpoint: Path, data: Path, save: Path) -> tuple[int, bool]:
    from megatron_eaft.train.trainer import run_training

    stop = StopSignals()
    stop.received = "SIGTERM"  # as if it came during the model build
    result = run_training(
        helpers.finetune_config(checkpoint, data, f"checkpoint.save={save}"), stop
    )
    return len(result.records), result.stopped_by_signal


def test_a_signal_during_start_up_stops_before_the_first_step(
    dist, tiny_checkpoint, packed_dataset, tmp_path
):
    save = tmp_path / "ckpt"
    assert dist.run(fit_after_an_early_signal, 1, tiny_checkpoint, packed_dataset, save) == [
        (0, True)
    ]
    assert latest_iteration(save) is None  # nothing new to save
