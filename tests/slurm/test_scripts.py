"""The sbatch scripts: syntax, shellcheck, and their steps run against fake srun/scontrol/CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_eaft.launch import resolve_launch_env

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "examples" / "slurm"
SBATCH_SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))
SHELL_SCRIPTS = [*SBATCH_SCRIPTS, SLURM_DIR / "common.sh"]
SHELLCHECK = Path(sys.executable).parent / "shellcheck"

# srun: log the command line, drop srun's own --options, run the rest (so a signal sent to
# srun's pid reaches the task, as srun forwards it). scontrol: host names and requeue.
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >>"$FAKE_LOG"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >>"$FAKE_LOG"
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-01\\ngpu-02\\ngpu-03\\ngpu-04\\n'; fi
"""
FAKE_TORCHRUN = """#!/bin/bash
echo "torchrun $*" >>"$FAKE_LOG"
"""
# The CLI: conversion and data preparation create their outputs; `finetune --print-config`
# runs the real configuration loader when FAKE_REAL_CONFIG=1 (else prints a line); finetune
# checks its config exists and, with FAKE_FINETUNE_WAIT=1, runs until SIGTERM, "checkpoints"
# and exits 0.
FAKE_EAFT = """#!/bin/bash
echo "eaft $*" >>"$FAKE_LOG"
output() { while [[ $# -gt 0 ]]; do if [[ $1 == --out || $1 == --output ]]; then echo "$2"; fi; shift; done; }
case $1 in
  convert) mkdir -p "$(output "$@")" ;;
  prepare-data) dir=$(output "$@"); mkdir -p "$dir"; echo '{}' >"$dir/metadata.json" ;;
  finetune)
    [[ -f $3 ]] || exit 3
    if [[ ${*: -1} == --print-config ]]; then
      if [[ ${FAKE_REAL_CONFIG:-0} == 1 ]]; then exec "$FAKE_PYTHON" -m megatron_eaft.cli.main "$@"; fi
      echo "resolved: $*"
      exit 0
    fi
    if [[ ${FAKE_FINETUNE_WAIT:-0} == 1 ]]; then
      trap 'echo "finetune checkpointed" >>"$FAKE_LOG"; exit 0' TERM
      touch "$FAKE_LOG.started"
      while true; do sleep 0.1; done
    fi
    exit "${FAKE_FINETUNE_EXIT:-0}" ;;
esac
"""


def sbatch_nodes(script: Path) -> int:
    return int(re.search(r"#SBATCH --nodes=(\d+)", script.read_text()).group(1))


@pytest.fixture
def job(tmp_path):
    """Environment of a fake SLURM job with fake tools on PATH; returns (env, log path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [
        ("srun", FAKE_SRUN),
        ("scontrol", FAKE_SCONTROL),
        ("torchrun", FAKE_TORCHRUN),
        ("fake-eaft", FAKE_EAFT),
    ]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    (tmp_path / "data.jsonl").write_text("{}\n")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "gpu-[01-04]",
        "HF_DIR": str(tmp_path / "hf"),
        "WORK_DIR": str(tmp_path / "work"),
        "DATA_JSONL": str(tmp_path / "data.jsonl"),
        "EAFT_CMD": str(bin_dir / "fake-eaft"),
        "FAKE_PYTHON": sys.executable,
        "CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.09-py3",
        "CONTAINER_MOUNTS": "/lustre:/lustre",
        "FAKE_LOG": str(log),
    }
    return env, log


def run_script(script: Path, env: dict, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script)],
        env={**env, **overrides},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def overrides(call: str) -> dict[str, str]:
    """The --set KEY=VALUE pairs of a logged command line."""
    words = call.split()
    return dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "--set")


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shellcheck(script):
    result = subprocess.run(
        [str(SHELLCHECK), "-x", "--source-path=SCRIPTDIR", str(script)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_shellcheck_is_live(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/*\n")
    result = subprocess.run([str(SHELLCHECK), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout


def test_first_run_converts_prepares_and_starts_from_the_converted_model(job):
    env, log = job
    result = run_script(SLURM_DIR / "qwen3_4b.sbatch", env)
    assert result.returncode == 0, result.stderr
    work = Path(env["WORK_DIR"])
    run_dir = work / "runs" / "qwen3-4b"
    lines = calls(log)
    eaft = [line for line in lines if line.startswith("eaft ")]
    assert eaft[0] == (
        f"eaft convert import --hf {env['HF_DIR']} --out {work}/checkpoints/qwen3-4b "
        "--dtype bf16 --transformer-impl transformer_engine"
    )
    assert eaft[1].startswith(f"eaft prepare-data --input {env['DATA_JSONL']} --tokenizer")
    assert f"--output {work}/data/qwen3-4b-16384 --seq-length 16384" in eaft[1]
    config = REPO / "examples" / "configs" / "qwen3_4b.yaml"
    check, training = eaft[2], eaft[3]
    assert check.startswith(f"eaft finetune --config {SLURM_DIR}/../configs/qwen3_4b.yaml --set")
    assert check.endswith("--print-config") and check.removesuffix(" --print-config") == training
    assert overrides(training) == {
        "model.checkpoint": f"{work}/checkpoints/qwen3-4b",
        "data.path": f"{work}/data/qwen3-4b-16384",
        "checkpoint.save": f"{run_dir}/checkpoints",
        "checkpoint.load": "null",
        "logging.tensorboard_dir": f"{run_dir}/tensorboard",
        "logging.metrics_file": f"{run_dir}/metrics.jsonl",
    }
    assert config.is_file()
    resolved = run_dir / "configs" / "config.1234.0.yaml"
    assert resolved.read_text().startswith("resolved: finetune --config")

    srun_training = [line for line in lines if line.startswith("srun") and "finetune" in line]
    training_step = srun_training[-1]
    assert "--ntasks-per-node=8" in training_step and "--print-config" not in training_step
    assert "--container-image=nvcr.io#nvidia/pytorch:25.09-py3" in training_step
    assert "--container-mounts=/lustre:/lustre" in training_step
    assert "torchrun" not in training_step
    single_task_steps = [
        line for line in lines if line.startswith("srun") and line != training_step
    ]
    assert len(single_task_steps) == 3 and all("--ntasks=1" in line for line in single_task_steps)


def test_requeued_run_skips_done_steps_and_resumes(job):
    env, log = job
    assert run_script(SLURM_DIR / "qwen3_4b.sbatch", env).returncode == 0
    save_dir = Path(env["WORK_DIR"]) / "runs" / "qwen3-4b" / "checkpoints"
    save_dir.mkdir(parents=True)
    (save_dir / "latest_checkpointed_iteration.txt").write_text("200")
    log.unlink()
    result = run_script(SLURM_DIR / "qwen3_4b.sbatch", env, SLURM_RESTART_COUNT="1")
    assert result.returncode == 0, result.stderr
    eaft = [line for line in calls(log) if line.startswith("eaft ")]
    assert [line.split()[1] for line in eaft] == ["finetune", "finetune"]
    assert overrides(eaft[1])["checkpoint.load"] == str(save_dir)
    assert "conversion skipped" in result.stderr and "preparation skipped" in result.stderr
    assert "resuming from" in result.stderr and "(iteration 200)" in result.stderr
    assert (save_dir.parent / "configs" / "config.1234.1.yaml").is_file()


def test_torchrun_variant_runs_one_torchrun_per_node(job):
    env, log = job
    result = run_script(
        SLURM_DIR / "qwen3_32b.sbatch", env, SLURM_JOB_NUM_NODES="4", LAUNCHER="torchrun"
    )
    assert result.returncode == 0, result.stderr
    (training,) = [
        line for line in calls(log) if line.startswith("srun") and "torchrun --nnodes" in line
    ]
    port = resolve_launch_env(
        {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
        | {"SLURM_NTASKS": "32", "SLURM_JOB_NODELIST": "gpu-[01-04]"}
    ).master_port
    assert "--nodes=4" in training and "--ntasks-per-node=1 " in training
    assert "--ntasks-per-node=8" not in training
    assert f"--nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=gpu-01:{port}" in (
        training
    )
    assert "-m megatron_eaft.cli.main finetune --config" in training


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda path: path.name)
def test_every_model_script_gives_the_trainer_a_valid_config_for_its_allocation(job, script):
    env, log = job
    nodes = sbatch_nodes(script)
    result = run_script(script, env, SLURM_JOB_NUM_NODES=str(nodes), FAKE_REAL_CONFIG="1")
    assert result.returncode == 0, result.stderr
    training = [line for line in calls(log) if line.startswith("srun") and "finetune" in line][-1]
    assert f"--nodes={nodes}" in training and "--ntasks-per-node=8" in training
    # The configuration check ran the trainer's own loader: this is what it will train with.
    resolved = Path(env["WORK_DIR"]) / "runs" / script.stem.replace("_", "-")
    (resolved_file,) = resolved.parent.glob("*/configs/config.1234.0.yaml")
    config = yaml.safe_load(resolved_file.read_text())
    parallel, data = config["parallel"], config["data"]
    model_parallel = parallel["tensor"] * parallel["pipeline"] * parallel["context"]
    gpus = nodes * 8
    assert gpus % model_parallel == 0
    data_parallel = gpus // model_parallel
    assert data["global_batch_size"] % (data["micro_batch_size"] * data_parallel) == 0
    assert parallel["tensor"] <= 8  # tensor parallelism stays inside a node
    assert config["model"]["checkpoint"].startswith(env["WORK_DIR"])
    assert config["checkpoint"]["save"].endswith("/checkpoints")


def test_sigterm_checkpoints_and_requeues(job):
    env, log = job
    process = subprocess.Popen(
        ["bash", str(SLURM_DIR / "qwen3_4b.sbatch")],
        env={**env, "FAKE_FINETUNE_WAIT": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = Path(f"{log}.started")
    deadline = time.monotonic() + 60
    while not started.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "finetune never started"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    lines = calls(log)
    assert "finetune checkpointed" in lines
    assert lines[-1] == "scontrol requeue 1234"
    assert "SIGTERM" in stderr and "requeueing job 1234" in stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"HF_DIR": ""}, "set HF_DIR"),
        ({"DATA_JSONL": ""}, "is not prepared and DATA_JSONL is not set"),
        ({"LAUNCHER": "mpirun"}, "LAUNCHER=mpirun: expected srun or torchrun"),
        ({"FAKE_FINETUNE_EXIT": "2"}, "finetune failed with exit status 2"),
        ({"MODEL_CONFIG": "/nonexistent.yaml"}, "config not found: /nonexistent.yaml"),
        ({"SLURM_SUBMIT_DIR": "/"}, "common.sh not found"),
    ],
)
def test_failures_stop_the_job_with_a_reason(job, overrides, message):
    env, log = job
    result = run_script(SLURM_DIR / "qwen3_4b.sbatch", env, **overrides)
    assert result.returncode != 0
    assert message in result.stderr
    assert not any(line.startswith("scontrol requeue") for line in calls(log))


def test_dry_run_runs_nothing(job):
    env, log = job
    result = run_script(SLURM_DIR / "qwen3_4b.sbatch", env, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    assert calls(log) == []
    assert "convert import" in result.stderr and "finetune --config" in result.stderr
    assert "--print-config" in result.stderr


def test_training_environment():
    script = f'source "{SLURM_DIR}/common.sh"; eaft_setup_env; env'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    exported = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert exported["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert exported["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert exported["NCCL_NVLS_ENABLE"] == "0"
    assert exported["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert int(exported["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) >= 1800
    assert exported["HF_HUB_OFFLINE"] == "1"


def test_sbatch_headers():
    for script in SBATCH_SCRIPTS:
        text = script.read_text()
        assert "#SBATCH --requeue" in text
        assert re.search(r"#SBATCH --signal=B:TERM@\d+", text)
        assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
