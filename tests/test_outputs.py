"""megatron_eaft.outputs: temporaries of killed writes are removed (only theirs), a full disk
is recognised wherever it hides in an exception chain."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from megatron_eaft import outputs
from megatron_eaft.outputs import (
    OutputKind,
    atomic_output_dir,
    disk_full_as_error,
    disk_full_cause,
)

KIND = OutputKind("test", "a test output", ("data.bin",))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def temporary_of(target: Path, pid: int, suffix: str = outputs.INCOMPLETE_SUFFIX, host=None):
    """A temporary directory of ``target`` as process ``pid`` on ``host`` would name it."""
    path = target.with_name(
        f".{target.name}.{host or outputs._host()}.{pid}.{uuid.uuid4().hex[:8]}{suffix}"
    )
    path.mkdir()
    (path / "data.bin").write_bytes(b"x" * 1000)
    return path


def test_a_killed_write_is_removed_by_the_next_write_of_its_target(tmp_path, caplog):
    target = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import time
        from megatron_eaft.outputs import OutputKind, atomic_output_dir
        with atomic_output_dir({str(target)!r}, kind=OutputKind("test", "a test", ())) as tmp:
            (tmp / "data.bin").write_bytes(b"x" * 100_000)
            print(tmp, flush=True)
            time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(outputs.__file__).parents[1])}
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    killed = Path(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert killed.is_dir() and not target.exists()

    live = temporary_of(target, os.getpid())  # a write still running (this process)
    elsewhere = temporary_of(target, dead_pid(), host="otherhost")  # cannot be checked here
    other_target = temporary_of(tmp_path / "out2", dead_pid())  # not this target's
    logs = caplog.at_level(logging.WARNING, logger="megatron_eaft.outputs")
    with logs, atomic_output_dir(target, kind=KIND) as tmp:
        (tmp / "data.bin").write_bytes(b"new")
    assert not killed.exists()
    assert live.is_dir() and elsewhere.is_dir() and other_target.is_dir()
    assert (target / "data.bin").read_bytes() == b"new"
    messages = [record.getMessage() for record in caplog.records]
    assert any(
        m.startswith(f"removed {killed} (100.00 kB) left by a killed write of {target} (pid ")
        for m in messages
    ), messages
    assert f"left in place {elsewhere}: written by host otherhost" in " ".join(messages)


def test_a_replaced_output_is_kept_when_the_new_one_never_arrived(tmp_path, caplog):
    target = tmp_path / "out"
    retired = temporary_of(target, dead_pid(), outputs.RETIRED_SUFFIX)
    with caplog.at_level(logging.WARNING, logger="megatron_eaft.outputs"):
        assert outputs.remove_stale_temporaries(target) == []
    assert retired.is_dir() and "rename it back" in caplog.text
    target.mkdir()
    assert outputs.remove_stale_temporaries(target) == [retired]


def test_a_temporary_file_of_a_killed_write_is_removed(tmp_path):
    target = tmp_path / "tracker.txt"
    stale = temporary_of(target, dead_pid())
    outputs.write_text_atomically(target, "10\n")
    assert target.read_text() == "10\n" and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tracker.txt"]


def test_full_disk_is_found_in_causes_contexts_and_dcp_failures(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError:
            # torch.save's zip writer: its own message, the OSError only as the context.
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from None
    except RuntimeError as error:
        assert error.__suppress_context__ and disk_full_cause(error) is full
    assert disk_full_cause(ValueError("unrelated")) is None
    quota = pytest.raises(outputs.DiskFullError, match=f"disk quota exceeded writing {tmp_path}")
    with quota, disk_full_as_error(tmp_path):
        raise RuntimeError("write failed") from OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(PermissionError), disk_full_as_error(tmp_path):
        raise PermissionError(errno.EACCES, "Permission denied")
