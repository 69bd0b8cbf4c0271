"""Killed runs resume from their last complete checkpoint and continue exactly.

The killed run is the real thing: `megatron-eaft finetune` started as two processes with the
env:// variables torchrun or srun would set, stopped by SIGTERM (checkpoint at the end of the
step, exit 0) or by SIGKILL in the middle of writing a checkpoint. The continuation and an
uninterrupted reference run in the test's worker pool, with the same thread count.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_eaft.train.checkpointing import latest_iteration

WORLD_SIZE = 2
ITERATIONS = 8
REPO = Path(__file__).resolve().parents[2]


def run_config(model_dir: Path, data_dir: Path, out: Path, sections: dict) -> dict:
    config = {
        "model": {"checkpoint": str(model_dir), "dtype": "fp32", "transformer_impl": "local"},
        "data": {"path": str(data_dir), "micro_batch_size": 1, "global_batch_size": 4},
        "train": {"iterations": ITERATIONS},
        "optimizer": {"lr": 1e-3, "warmup_iterations": 2, "min_lr": 1e-4},
        "eaft": {"kind": "eaft"},
        "checkpoint": {"save": str(out / "checkpoints")},
        "logging": {"interval": 1, "metrics_file": str(out / "metrics.jsonl")},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def fit_in_pool(config: dict) -> list[tuple[int, dict]]:
    """(iteration, report sums) of every step this rank ran."""
    from megatron_eaft.train.config import config_from_dict
    from megatron_eaft.train.trainer import run_training

    result = run_training(config_from_dict(config))
    return [(r.iteration, {k: list(v) for k, v in r.reports.items()}) for r in result.records]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finetune_command(config: dict, out: Path) -> list[str]:
    """Writes the config to out/run.yaml; `python -m megatron_eaft.cli.main finetune` on it."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "run.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return [
        sys.executable,
        "-m",
        "megatron_eaft.cli.main",
        "finetune",
        "--config",
        str(config_path),
    ]


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`command` in its own session (as torchrun starts workers), output to `log`."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            command,
            env={**env, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def launch(config: dict, out: Path) -> list[subprocess.Popen]:
    """`megatron-eaft finetune` as WORLD_SIZE processes with the variables torchrun would set."""
    command = finetune_command(config, out)
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // WORLD_SIZE)  # what the worker pool uses
    processes = []
    for rank in range(WORLD_SIZE):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads),
        }
        processes.append(start(command, env, out / f"rank{rank}.log"))
    return processes


def wait_for(condition, processes, timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in processes):
            raise AssertionError(f"the run exited before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def finish(processes, timeout: float = 120) -> list[int]:
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            codes.append(process.wait())
    return codes


def metrics_iterations(path: Path) -> dict[int, dict]:
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["iteration"]: line["sums"] for line in lines if "sums" in line}


def assert_continues_exactly(reference, resumed, start: int) -> None:
    assert [it for it, _ in resumed] == list(range(start + 1, ITERATIONS + 1))
    expected = dict(reference)
    for iteration, sums in resumed:
        assert sums == expected[iteration], (
            f"iteration {iteration} differs from the uninterrupted run"
        )


@pytest.mark.slow
def test_sigterm_checkpoints_at_step_end_and_resumes_exactly(
    dist, tiny_checkpoint, packed_dataset, tmp_path
):
    # DP2 with the distributed optimizer; the SIGTERM checkpoint is not a periodic one.
    sections = {"checkpoint": {"save_interval": 100}}
    killed = run_config(tiny_checkpoint, packed_dataset, tmp_path / "killed", sections)
    killed["logging"]["tensorboard_dir"] = str(tmp_path / "killed" / "tb")
    processes = launch(killed, tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    try:
        wait_for(lambda: len(metrics_iterations(metrics)) >= 2, processes, 300, "iteration 2")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
    assert finish(processes) == [0, 0]
    stopped = latest_iteration(tmp_path / "killed" / "checkpoints")
    assert isinstance(stopped, int) and 2 <= stopped < ITERATIONS
    log = (tmp_path / "killed" / f"rank{WORLD_SIZE - 1}.log").read_text()
    assert f"SIGTERM: stopped after iteration {stopped} (checkpoint saved)" in log

    reference = dist.run(
        fit_in_pool,
        WORLD_SIZE,
        run_config(tiny_checkpoint, packed_dataset, tmp_path / "reference", sections),
    )[-1]
    before_kill = metrics_iterations(metrics)
    assert sorted(before_kill) == list(range(1, stopped + 1))
    for iteration, sums in before_kill.items():
        assert sums == dict(reference)[iteration], "the subprocess run is not the reference run"
    resumed = dist.run(fit_in_pool, WORLD_SIZE, killed)[-1]
    assert_continues_exactly(reference, resumed, stopped)

    # What the user sees: a console line per step with every report key, TensorBoard scalars.
    line = next(line for line in log.splitlines() if line.startswith("iteration        1/"))
    for field in (
        "ms/iter",
        "tokens/s",
        "lr",
        "lm loss",
        "eaft loss",
        "eaft/mean_weight",
        "eaft/mean_entropy",
        "eaft/confident_conflict_frac",
        "grad norm",
    ):
        assert field in line, field
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "killed" / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "lm loss",
        "eaft loss",
        "lm loss vs samples",
        "grad-norm",
        "learning-rate",
        "tokens-per-sec",
    } <= tags
    assert [e.step for e in events.Scalars("lm loss")] == list(range(1, ITERATIONS + 1))


@pytest.mark.slow
def test_sigkill_mid_save_resumes_from_last_complete_checkpoint(
    dist, tiny_checkpoint, packed_dataset, tmp_path
):
    # TP2; a checkpoint every step, so the kill lands in the middle of one.
    sections = {"parallel": {"tensor": 2}, "checkpoint": {"save_interval": 1}}
    killed = run_config(tiny_checkpoint, packed_dataset, tmp_path / "killed", sections)
    save_dir = tmp_path / "killed" / "checkpoints"
    processes = launch(killed, tmp_path / "killed")

    def saving_after_a_complete_checkpoint() -> bool:
        complete = latest_iteration(save_dir) if save_dir.is_dir() else None
        if complete is None:
            return False
        return any(
            p.name.endswith(".incomplete") and p.name != f".iter_{complete:07d}.incomplete"
            for p in os.scandir(save_dir)
        )

    try:
        wait_for(saving_after_a_complete_checkpoint, processes, 300, "a save after a complete one")
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
    assert finish(processes) == [-signal.SIGKILL] * WORLD_SIZE
    complete = latest_iteration(save_dir)
    leftovers = [p.name for p in save_dir.iterdir() if p.name.endswith(".incomplete")]
    assert leftovers, "the kill did not land during a save"
    assert (save_dir / f"iter_{complete:07d}").is_dir()

    reference = dist.run(
        fit_in_pool,
        WORLD_SIZE,
        run_config(tiny_checkpoint, packed_dataset, tmp_path / "reference", sections),
    )[-1]
    resumed = dist.run(fit_in_pool, WORLD_SIZE, killed)[-1]
    assert_continues_exactly(reference, resumed, complete)
    assert not [p for p in save_dir.iterdir() if p.name.endswith(".incomplete")]
    assert latest_iteration(save_dir) == ITERATIONS
