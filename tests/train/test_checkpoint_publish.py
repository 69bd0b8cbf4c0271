"""The trainer's save publish path on a full disk, without a distributed run: one clear error
naming the checkpoint, and the tracker still naming the last complete checkpoint."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

from megatron_eaft.models import checkpoint_dir as ckpt
from megatron_eaft.models.bridge_config import BRIDGE_RUN_CONFIG_FILE
from megatron_eaft.models.metadata import ModelMetadata
from megatron_eaft.outputs import DiskFullError
from megatron_eaft.train import checkpointing
from tests.convert import tiny_models
from tests.convert.test_bridge_run_config import BRIDGE_READS


class Scheduler:
    def state_dict(self) -> dict:
        return {"step": 3}


def single_rank_save(monkeypatch, save) -> None:
    """save_checkpoint's collective calls and state gathering, reduced to one process."""
    from megatron.core import dist_checkpointing

    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(checkpointing, "_model_and_optimizer_state", lambda *a, **k: {})
    monkeypatch.setattr(checkpointing, "_sharded_rng_state", lambda *a: None)
    monkeypatch.setattr(checkpointing, "_rng_state", lambda: {})
    monkeypatch.setattr(checkpointing, "_layout", lambda: {"tensor": 2, "pipeline": 1})
    monkeypatch.setattr(checkpointing, "_save_strategy", lambda: None)
    monkeypatch.setattr(dist_checkpointing, "save", save)


def write_a_file(state, directory: str, **kwargs) -> None:
    (Path(directory) / "__0_0.distcp").write_bytes(b"weights")


def save(root: Path, iteration: int) -> Path:
    return checkpointing.save_checkpoint(
        root,
        iteration,
        model=None,
        optimizer=None,
        scheduler=Scheduler(),
        trainer_state={},
        model_description=ModelMetadata.for_hf_config(
            tiny_models.hf_config("qwen3_untied").to_dict(), dtype="fp32", transformer_impl="local"
        ),
        optimizer_sharding="fully_reshardable",
    )


def test_save_publishes_the_iteration_then_the_tracker(monkeypatch, tmp_path):
    single_rank_save(monkeypatch, write_a_file)
    assert save(tmp_path, 10) == tmp_path / "iter_0000010"
    assert ckpt.read_tracker(tmp_path) == 10
    assert not list(tmp_path.glob(".*")), "no temporaries left"


def test_a_saved_iteration_carries_the_run_config_bridge_loads(monkeypatch, tmp_path):
    single_rank_save(monkeypatch, write_a_file)
    run_config = yaml.safe_load((save(tmp_path, 10) / BRIDGE_RUN_CONFIG_FILE).read_text())
    for section, keys in BRIDGE_READS.items():
        assert set(keys) <= run_config[section].keys()
    assert run_config["model"]["tensor_model_parallel_size"] == 2  # the run's layout
    # Our optimizer and RNG state are not in Bridge's layout: it must not try to restore them.
    assert run_config["checkpoint"]["save_optim"] is False
    assert run_config["checkpoint"]["save_rng"] is False


def test_full_disk_in_dcp_save_is_one_error_naming_the_checkpoint(monkeypatch, tmp_path):
    single_rank_save(monkeypatch, write_a_file)
    save(tmp_path, 10)

    def full_disk(state, directory: str, **kwargs) -> None:
        # What torch DCP raises: per-rank failures, the OSError inside one of them.
        try:
            raise OSError(errno.ENOSPC, "No space left on device", f"{directory}/__1_0.distcp")
        except OSError as error:
            raise CheckpointException("save failed", {1: _wrap_exception(error)}) from None

    monkeypatch.setattr("megatron.core.dist_checkpointing.save", full_disk)
    with pytest.raises(DiskFullError) as info:
        save(tmp_path, 20)
    message = str(info.value)
    assert message.startswith(f"no space left on device writing {tmp_path / 'iter_0000020'}: ")
    assert " free of " in message and "\n" not in message
    assert ckpt.read_tracker(tmp_path) == 10


def test_full_disk_while_publishing_keeps_the_previous_tracker(monkeypatch, tmp_path):
    single_rank_save(monkeypatch, write_a_file)
    save(tmp_path, 10)

    def no_space(path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("megatron_eaft.outputs.fsync_file", no_space)
    tracker = tmp_path / ckpt.TRACKER_FILE
    with pytest.raises(DiskFullError, match=f"no space left on device writing {tracker}: "):
        save(tmp_path, 20)
    assert ckpt.read_tracker(tmp_path) == 10
    assert tracker.read_text() == "10\n"
    assert not list(tmp_path.glob(f".{ckpt.TRACKER_FILE}.*")), "the tracker's temporary is gone"
