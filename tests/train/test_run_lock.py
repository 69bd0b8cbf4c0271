"""One run per checkpoint.save: the second fails at once naming the holder (host, pid)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from megatron_eaft.train.run_lock import LOCK_FILE, RunLockError, acquire_run_lock
from tests.train.test_resume import REPO

_HOLDER = """
import sys, time
from megatron_eaft.train.run_lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_second_lock_names_the_holder_and_release_frees_it(tmp_path):
    save = tmp_path / "ckpt"
    with acquire_run_lock(save):
        # flock conflicts between two opens even within one process.
        with pytest.raises(RunLockError) as caught:
            acquire_run_lock(save)
        message = str(caught.value)
        assert str(save) in message
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
    acquire_run_lock(save).release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    save = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(save)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=f"pid {holder.pid},"):
            acquire_run_lock(save)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The record of the dead holder is still in the file; the lock is not.
    assert f'"pid": {holder.pid}' in (save / LOCK_FILE).read_text()
    acquire_run_lock(save).release()


def test_finetune_refuses_a_locked_save_before_importing_megatron(tmp_path):
    save = tmp_path / "ckpt"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{preset: tiny-qwen3}}\ntrain: {{iterations: 1}}\ncheckpoint: {{save: {save}}}\n"
    )
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
    }
    command = [sys.executable, "-X", "importtime", "-m", "megatron_eaft.cli.main", "finetune"]
    with acquire_run_lock(save):
        finished = subprocess.run(
            [*command, "--config", str(config)],
            env={**environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert finished.returncode == 2
    errors = [line for line in finished.stderr.splitlines() if not line.startswith("import time")]
    assert errors == [line for line in errors if line.startswith("megatron-eaft finetune: ")], (
        finished.stderr
    )
    assert f"is in use by another run (host {socket.gethostname()}, pid {os.getpid()}," in (
        finished.stderr
    )
    imported = [line.split("|")[-1].strip() for line in finished.stderr.splitlines()]
    assert "megatron.core" not in imported
