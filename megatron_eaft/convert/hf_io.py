"""Sharded safetensors, read and written one tensor at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
name to dtype, shape and byte range, then the raw data. Reading maps a tensor's bytes
(nothing is read until used, and a tensor that is only copied elsewhere can go file-to-file
in the kernel, see :meth:`SafetensorsReader.file_span`). Writing computes every header up
front from the planned names and shapes, then streams the data.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from megatron_eaft.models.metadata import read_json_object

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
CONFIG_FILE = "config.json"

DTYPE_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: code for code, dtype in DTYPE_CODES.items()}

Shape = tuple[int, ...]


class HFCheckpointError(ValueError):
    """An HF checkpoint directory is incomplete or inconsistent; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: torch.dtype
    shape: Shape
    start: int  # absolute byte offset in the file
    nbytes: int


def read_json(path: Path) -> dict:
    return read_json_object(path, HFCheckpointError)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        raw_length = f.read(8)
        if len(raw_length) != 8:
            raise HFCheckpointError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw_length)
        file_size = os.fstat(f.fileno()).st_size
        if length > file_size - 8:
            raise HFCheckpointError(f"{path}: header length {length} exceeds the file")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HFCheckpointError(f"{path}: invalid safetensors header: {exc}") from None
    data_start = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPE_CODES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise HFCheckpointError(
                f"{path}: tensor {name!r} has a malformed header entry {entry}"
            ) from None
        nbytes = end - begin
        if nbytes != math.prod(shape) * dtype.itemsize or data_start + end > file_size:
            raise HFCheckpointError(
                f"{path}: tensor {name!r} byte range {begin}..{end} does not match "
                f"{entry['dtype']}{list(shape)} or runs past the end of the file"
            )
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return tensors


class SafetensorsReader:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / SAFETENSORS_INDEX
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFCheckpointError(f"{index_path}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_SAFETENSORS).is_file():
            weight_map, files = None, [SINGLE_SAFETENSORS]
        else:
            raise HFCheckpointError(
                f"{self.directory}: neither {SAFETENSORS_INDEX} nor {SINGLE_SAFETENSORS} found "
                "(only safetensors checkpoints are supported)"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for file_name in files:
            path = self.directory / file_name
            if not path.is_file():
                raise HFCheckpointError(f"{index_path}: lists {file_name}, which does not exist")
            for name, info in read_safetensors_header(path).items():
                if name in self.tensors:
                    raise HFCheckpointError(
                        f"tensor {name!r} is in both {self.tensors[name].path.name} and {file_name}"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            misplaced = sorted(
                n
                for n, f in weight_map.items()
                if n not in self.tensors or self.tensors[n].path.name != f
            )
            if misplaced:
                raise HFCheckpointError(
                    f"{index_path}: weight_map disagrees with the shard files for {misplaced[:10]}"
                    + (f" and {len(misplaced) - 10} more" if len(misplaced) > 10 else "")
                )
        self._handles: dict[Path, BinaryIO] = {}
        self._sources: dict[tuple[int, int], tuple[int, int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def _handle(self, path: Path) -> BinaryIO:
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open(path, "rb", buffering=0)  # noqa: SIM115
        return handle

    def prefetch(self, names: Iterable[str]) -> None:
        """Ask the kernel to start reading these tensors now (no memory of ours is used)."""
        if not hasattr(os, "posix_fadvise"):
            return
        for name in names:
            info = self.tensors[name]
            os.posix_fadvise(
                self._handle(info.path).fileno(), info.start, info.nbytes, os.POSIX_FADV_WILLNEED
            )

    def read(self, name: str) -> torch.Tensor:
        """The tensor, backed by a private mapping of its bytes in the file.

        Nothing is read until the data is touched. Until :meth:`forget_sources`, the reader
        remembers where each such tensor's bytes live (:meth:`file_span`), so a writer can
        copy them file-to-file in the kernel instead of through this process's memory.
        """
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        fd = self._handle(info.path).fileno()
        aligned = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        # MAP_PRIVATE + PROT_WRITE: torch wants a writable buffer; pages stay shared with the
        # page cache unless someone writes to them, which nothing here does.
        mapping = mmap.mmap(
            fd,
            info.start + info.nbytes - aligned,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
        tensor = torch.frombuffer(
            mapping,
            dtype=info.dtype,
            count=info.nbytes // info.dtype.itemsize,
            offset=info.start - aligned,
        ).reshape(info.shape)
        self._sources[(tensor.data_ptr(), info.nbytes)] = (fd, info.start)
        return tensor

    def file_span(self, address: int, nbytes: int) -> tuple[int, int] | None:
        """(fd, offset) of the file bytes behind a tensor from :meth:`read`, if still known."""
        return self._sources.get((address, nbytes))

    def forget_sources(self) -> None:
        """Drop the spans of tensors read so far; call once they are freed (addresses recycle)."""
        self._sources.clear()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: Shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_SAFETENSORS]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def plan_shards(
    tensors: Sequence[PlannedTensor], max_shard_bytes: int
) -> list[list[PlannedTensor]]:
    """Consecutive tensors into shards of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards if shards[0] else []


def _header_bytes(tensors: Sequence[PlannedTensor], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # Data must start 8-byte aligned; safetensors pads the header with spaces.
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


class SafetensorsShardWriter:
    """Writes planned shards in order; tensors must arrive in plan order."""

    def __init__(
        self,
        directory: str | os.PathLike,
        shards: Sequence[Sequence[PlannedTensor]],
        *,
        fsync: bool = True,
    ):
        self.directory = Path(directory)
        self.shards = [list(s) for s in shards]
        self.names = shard_names(len(self.shards))
        self.fsync = fsync
        self._order: Iterator[tuple[int, PlannedTensor]] = (
            (i, t) for i, shard in enumerate(self.shards) for t in shard
        )
        self._shard_index = -1
        self._file: BinaryIO | None = None
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            shard_index, planned = next(self._order)
        except StopIteration:
            raise ValueError(f"tensor {name!r} was not planned") from None
        if (
            planned.name != name
            or tuple(tensor.shape) != planned.shape
            or tensor.dtype != planned.dtype
        ):
            raise ValueError(
                f"expected {planned.name} {planned.dtype}{list(planned.shape)} next, got "
                f"{name} {tensor.dtype}{list(tensor.shape)}"
            )
        if shard_index != self._shard_index:
            self._open(shard_index)
        assert self._file is not None
        data = tensor.detach().contiguous()
        if data.numel():
            self._file.write(memoryview(data.view(-1).view(torch.uint8).numpy()))
        self.bytes_written += planned.nbytes

    def _open(self, shard_index: int) -> None:
        self._close_file()
        self._shard_index = shard_index
        self._file = open(self.directory / self.names[shard_index], "wb")  # noqa: SIM115
        self._file.write(_header_bytes(self.shards[shard_index], {"format": "pt"}))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> None:
        leftover = next(self._order, None)
        if leftover is not None:
            raise ValueError(f"tensor {leftover[1].name} was planned but never written")
        self._close_file()
        if len(self.shards) > 1:
            weight_map = {
                t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard
            }
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(self.directory / SAFETENSORS_INDEX, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def total_bytes(infos: Iterable[TensorInfo]) -> int:
    return sum(i.nbytes for i in infos)
