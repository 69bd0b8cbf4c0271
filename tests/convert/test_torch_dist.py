"""The single-process torch_dist writer and the chunk reader, on their own."""

from __future__ import annotations

import pytest
import torch

from megatron_eaft.convert.torch_dist import (
    CheckpointFormatError,
    TorchDistReader,
    TorchDistWriter,
    sharded_object_key,
)


def test_reader_assembles_regions_across_chunks_and_files(tmp_path):
    full = torch.arange(4 * 6 * 2, dtype=torch.float32).reshape(4, 6, 2)
    writer = TorchDistWriter(tmp_path / "ckpt", max_file_bytes=1, fsync=False)
    for layer in range(4):  # per layer, each split in two uneven row pieces
        writer.write_chunk("w", full[layer : layer + 1, :4], (layer, 0, 0), full.shape)
        writer.write_chunk("w", full[layer : layer + 1, 4:], (layer, 4, 0), full.shape)
    writer.write_object("w._extra_state", {"fp8": None}, (3,), (4,))
    writer.finish({"iteration": 0})
    assert len(list((tmp_path / "ckpt").glob("*.distcp"))) > 4, "max_file_bytes rotates files"
    reader = TorchDistReader(tmp_path / "ckpt")
    assert reader.tensor_keys() == {"w": ((4, 6, 2), torch.float32)}
    assert torch.equal(reader.read("w"), full)
    assert torch.equal(reader.read("w", (1, 2, 0), (2, 3, 2)), full[1:3, 2:5])
    assert reader.read_object(sharded_object_key("w._extra_state", (3,), (4,))) == [{"fp8": None}]
    assert reader.read_object("common_state/shard_0_1") == [{"iteration": 0}]


def test_views_are_stored_without_their_whole_storage(tmp_path):
    big = torch.zeros(1000, 10)
    writer = TorchDistWriter(tmp_path / "ckpt", fsync=False)
    writer.write_chunk("row", big[5:6], (0, 0), (1, 10))
    writer.finish()
    assert writer.bytes_written < 10_000, "a 1-row view must not write the 40 kB storage"


def test_writer_refuses_gaps_overlaps_and_inconsistent_chunks(tmp_path):
    writer = TorchDistWriter(tmp_path / "gap", fsync=False)
    writer.write_chunk("w", torch.zeros(1, 3), (0, 0), (2, 3))
    with pytest.raises(ValueError, match="chunks cover 3 of 6 elements"):
        writer.finish()
    writer = TorchDistWriter(tmp_path / "twice", fsync=False)
    writer.write_chunk("w", torch.zeros(1, 3), (0, 0), (2, 3))
    writer.write_chunk("w", torch.zeros(1, 3), (0, 0), (2, 3))
    with pytest.raises(ValueError, match="two chunks start at the same offset"):
        writer.finish()
    writer = TorchDistWriter(tmp_path / "shape", fsync=False)
    writer.write_chunk("w", torch.zeros(1, 3), (0, 0), (2, 3))
    with pytest.raises(ValueError, match="earlier chunks said"):
        writer.write_chunk("w", torch.zeros(1, 3), (1, 0), (3, 3))
    with pytest.raises(ValueError, match="outside"):
        writer.write_chunk("w", torch.zeros(1, 3), (2, 0), (2, 3))
    with pytest.raises(FileExistsError, match="not empty"):
        TorchDistWriter(tmp_path / "shape")


def test_reader_reports_what_it_cannot_find(tmp_path):
    with pytest.raises(CheckpointFormatError, match=r"\.metadata is missing"):
        TorchDistReader(tmp_path)
    writer = TorchDistWriter(tmp_path / "ckpt", fsync=False)
    writer.write_chunk("w", torch.ones(2), (0,), (2,))
    writer.finish()
    reader = TorchDistReader(tmp_path / "ckpt")
    with pytest.raises(CheckpointFormatError, match="no tensor 'v'"):
        reader.read("v")
    data_file = next((tmp_path / "ckpt").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:10])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        reader.read("w")


def rank_megatron_save(directory: str) -> None:
    """A tiny state dict saved by Megatron itself over 2 ranks, split along rows."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel(tp=2)
    rank = torch.distributed.get_rank()
    full = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5)
    local = full[:, 2 * rank : 2 * rank + 2].clone()
    sharded = {
        "w": ShardedTensor.from_rank_offsets("w", local, (1, rank, 2), replica_id=0),
    }
    dist_checkpointing.save(sharded, directory)


def test_reader_reads_what_megatron_saved_across_ranks(dist, tmp_path):
    dist.run(rank_megatron_save, 2, str(tmp_path))
    reader = TorchDistReader(tmp_path)
    full = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5)
    assert torch.equal(reader.read("w"), full)
    assert torch.equal(reader.read("w", (1, 1, 0), (1, 2, 5)), full[1:2, 1:3])


def _big_safetensors(tmp_path):
    from safetensors.torch import save_file

    from megatron_eaft.convert.hf_io import SafetensorsReader

    tensor = torch.arange(1 << 20, dtype=torch.float32).reshape(1024, 1024)  # 4 MiB
    save_file({"a": tensor, "b": tensor[:3].clone()}, tmp_path / "model.safetensors")
    return tensor, SafetensorsReader(tmp_path)


@pytest.mark.parametrize("sendfile_works", [True, False])
def test_mapped_tensors_go_file_to_file_and_fall_back_to_writes(
    tmp_path, monkeypatch, sendfile_works
):
    import os

    expected, reader = _big_safetensors(tmp_path)
    calls = []
    real_sendfile = os.sendfile

    def sendfile(out_fd, in_fd, offset, count):
        calls.append(count)
        if not sendfile_works:
            raise OSError("cross-device")
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", sendfile)
    writer = TorchDistWriter(tmp_path / "ckpt", fsync=False, file_span=reader.file_span)
    mapped = reader.read("a")
    writer.write_chunk("a", mapped.reshape(1, 1024, 1024), (0, 0, 0), (2, 1024, 1024))
    doubled = mapped * 2  # a computed tensor: an ordinary write even at the same size
    writer.write_chunk("a", doubled.reshape(1, 1024, 1024), (1, 0, 0), (2, 1024, 1024))
    reader.forget_sources()
    writer.finish()
    assert calls and sum(calls) >= expected.nbytes
    stored = TorchDistReader(tmp_path / "ckpt").read("a")
    assert torch.equal(stored[0], expected) and torch.equal(stored[1], expected * 2)
