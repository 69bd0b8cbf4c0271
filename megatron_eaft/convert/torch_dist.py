"""Write and read Megatron-Core ``torch_dist`` checkpoints from one process, one chunk at a time.

On disk a torch_dist checkpoint is a PyTorch DCP directory: ``.distcp`` data files in which
every chunk of a tensor is a ``torch.save`` record, a pickled DCP ``Metadata`` (``.metadata``)
listing each key's global shape and chunks with the file, offset and length of each, and
Megatron's ``metadata.json`` naming the backend. Megatron's ``ShardedObject``s (``_extra_state``
and the common state) are BytesIO records under ``<key>/shard_<offset>_<shape>``.

``dcp.save`` wants the whole state dict at once; :class:`TorchDistWriter` instead appends
each chunk as it comes and writes the metadata at the end, so the converter holds one tensor
group in memory, never the model. Loading is DCP's own resharding: chunks need not match
the loader's TP/PP layout. :class:`TorchDistReader` does the reverse for export and reads any
region of a key from whatever chunks cover it, so it also reads checkpoints saved by
Megatron at any parallel layout.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

DCP_METADATA_FILE = ".metadata"
MEGATRON_METADATA_FILE = "metadata.json"
# What Megatron-Core 0.17+ writes for `torch_dist` (no separate common.pt).
MEGATRON_BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
COMMON_STATE_KEY = "common_state"
DCP_VERSION = "1.0.0"
DEFAULT_MAX_FILE_BYTES = 5 * 2**30

Shape = tuple[int, ...]


class CheckpointFormatError(ValueError):
    """A torch_dist directory is missing pieces or does not hold what was asked for."""


def sharded_object_key(key: str, global_offset: Sequence[int], global_shape: Sequence[int]) -> str:
    """The DCP name Megatron gives a ShardedObject (``ShardedObject.unique_key``)."""
    offset = ".".join(map(str, global_offset))
    shape = ".".join(map(str, global_shape))
    return f"{key}/shard_{offset}_{shape}"


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes: torch.save writes a view's whole storage."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if (
        not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
    ):
        tensor = tensor.contiguous().clone()
    return tensor


@contextlib.contextmanager
def _without_crc32() -> Iterator[None]:
    """torch.save without the per-record CRC32: torch.load does not check it, and computing
    it costs more CPU than the rest of the conversion (it is a global switch, so restore it)."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


@dataclass
class _KeyLayout:
    global_shape: Shape
    dtype: torch.dtype
    chunks: list[ChunkStorageMetadata]


class TorchDistWriter:
    """Appends tensor chunks and objects to a new torch_dist directory; ``finish`` seals it.

    Data goes to ``__0_<n>.distcp`` files of up to ``max_file_bytes`` each (a chunk is never
    split). Nothing makes the directory loadable before ``finish`` writes ``.metadata``.

    ``file_span(address, nbytes) -> (fd, offset) | None`` names a file holding a tensor's
    exact bytes (e.g. :meth:`SafetensorsReader.file_span`); such data is then copied with
    ``sendfile`` instead of through this process's memory.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        fsync: bool = True,
        file_span: FileSpanLookup | None = None,
    ):
        self.directory = Path(directory)
        self.file_span = file_span
        self.directory.mkdir(parents=True, exist_ok=True)
        if any(self.directory.iterdir()):
            raise FileExistsError(f"{self.directory} is not empty")
        self.max_file_bytes = max_file_bytes
        self.fsync = fsync
        self.bytes_written = 0
        self._layouts: dict[str, _KeyLayout] = {}
        self._objects: set[str] = set()
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self._file: _DataFile | None = None
        self._file_name = ""
        self._file_count = 0
        self._finished = False

    # -- data files -----------------------------------------------------------------------

    def _stream(self) -> _DataFile:
        if self._file is not None and self._file.tell() >= self.max_file_bytes:
            self._close_file()
        if self._file is None:
            self._file_name = f"__0_{self._file_count}.distcp"
            self._file_count += 1
            self._file = _DataFile(self.directory / self._file_name, self.file_span)
        return self._file

    def _close_file(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def _append(self, write: Any) -> _StorageInfo:
        stream = self._stream()
        start = stream.tell()
        write(stream)
        length = stream.tell() - start
        self.bytes_written += length
        return _StorageInfo(relative_path=self._file_name, offset=start, length=length)

    # -- public API -----------------------------------------------------------------------

    def write_chunk(
        self,
        key: str,
        tensor: torch.Tensor,
        offsets: Sequence[int],
        global_shape: Sequence[int],
    ) -> None:
        """Store ``tensor`` as the chunk of ``key`` (global shape ``global_shape``) at ``offsets``."""
        self._check_open()
        global_shape = tuple(int(s) for s in global_shape)
        offsets = tuple(int(o) for o in offsets)
        if len(offsets) != len(global_shape) or tensor.dim() != len(global_shape):
            raise ValueError(
                f"{key}: chunk of rank {tensor.dim()} at offsets {offsets} does not fit global "
                f"shape {global_shape}"
            )
        if any(
            o < 0 or o + s > g for o, s, g in zip(offsets, tensor.shape, global_shape, strict=True)
        ):
            raise ValueError(
                f"{key}: chunk {tuple(tensor.shape)} at {offsets} is outside {global_shape}"
            )
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _KeyLayout(global_shape, tensor.dtype, [])
        elif layout.global_shape != global_shape or layout.dtype != tensor.dtype:
            raise ValueError(
                f"{key}: chunk says {global_shape} {tensor.dtype}, earlier chunks said "
                f"{layout.global_shape} {layout.dtype}"
            )
        data = _standalone(tensor)
        with _without_crc32():
            info = self._append(lambda stream: torch.save(data, stream))
        self._storage[MetadataIndex(key, torch.Size(offsets))] = info
        layout.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(data.shape)))

    def write_object(
        self, key: str, value: Any, global_offset: Sequence[int], global_shape: Sequence[int]
    ) -> None:
        """Store a Megatron ShardedObject (e.g. a linear layer's ``_extra_state``)."""
        self._check_open()
        name = sharded_object_key(key, global_offset, global_shape)
        if name in self._objects:
            raise ValueError(f"object {name} written twice")
        buffer = io.BytesIO()
        # Megatron saves the list of the shard's object replicas; one replica here.
        torch.save([value], buffer)
        self._storage[MetadataIndex(name)] = self._append(
            lambda stream: stream.write(buffer.getbuffer())
        )
        self._objects.add(name)

    def finish(self, common_state: dict[str, Any] | None = None) -> None:
        """Validate that every key is exactly covered, then write the metadata files."""
        self._check_open()
        self.write_object(COMMON_STATE_KEY, common_state or {}, (0,), (1,))
        self._close_file()
        for key, layout in self._layouts.items():
            _check_exact_cover(key, layout.global_shape, layout.chunks)
        state_dict_metadata: dict[str, Any] = {
            key: TensorStorageMetadata(
                properties=TensorProperties(dtype=layout.dtype),
                size=torch.Size(layout.global_shape),
                chunks=layout.chunks,
            )
            for key, layout in self._layouts.items()
        }
        state_dict_metadata.update({name: BytesStorageMetadata() for name in self._objects})
        metadata = Metadata(
            state_dict_metadata=state_dict_metadata,
            planner_data=None,
            storage_data=self._storage,
            storage_meta=StorageMeta(checkpoint_id=str(self.directory), save_id=str(uuid.uuid4())),
            version=DCP_VERSION,
        )
        _write_file(self.directory / DCP_METADATA_FILE, pickle.dumps(metadata), self.fsync)
        _write_file(
            self.directory / MEGATRON_METADATA_FILE,
            json.dumps(MEGATRON_BACKEND).encode(),
            self.fsync,
        )
        self._finished = True

    def close(self) -> None:
        """Release the open data file (after an error); the directory stays unloadable."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"{self.directory}: writer already finished")


FileSpanLookup = Callable[[int, int], "tuple[int, int] | None"]


class _DataFile:
    """A ``.distcp`` file that torch.save writes into; known file spans go via sendfile.

    torch.save hands a tensor's storage to ``write`` as one buffer at the storage's address;
    when ``file_span`` knows a file holding exactly those bytes, the kernel copies them
    file-to-file (as ``cp`` does) and the data never enters this process. Anything else,
    and any ``sendfile`` failure, is an ordinary write.
    """

    def __init__(self, path: Path, file_span: FileSpanLookup | None):
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115
        self._file_span = file_span

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._file_span is not None and view.nbytes >= _SENDFILE_MIN_BYTES:
            address = np.frombuffer(view, dtype=np.uint8).ctypes.data
            span = self._file_span(address, view.nbytes)
            if span is not None and self._sendfile(*span, view.nbytes):
                return view.nbytes
        written = 0
        while written < view.nbytes:
            written += self._file.write(view[written:])
        return written

    def _sendfile(self, source_fd: int, offset: int, count: int) -> bool:
        start = self._file.tell()
        try:
            done = 0
            while done < count:
                sent = os.sendfile(self._file.fileno(), source_fd, offset + done, count - done)
                if sent == 0:
                    raise OSError("sendfile: source ended early")
                done += sent
        except OSError:
            self._file.seek(start)
            self._file.truncate()
            return False
        return True

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


# Below this, a plain write is as cheap as a system call that avoids it.
_SENDFILE_MIN_BYTES = 1 << 20


def _write_file(path: Path, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def _check_exact_cover(key: str, shape: Shape, chunks: Sequence[ChunkStorageMetadata]) -> None:
    """Chunks are inside the tensor, start at distinct offsets and add up to its volume."""
    starts = [tuple(c.offsets) for c in chunks]
    if len(set(starts)) != len(starts):
        raise ValueError(f"{key}: two chunks start at the same offset")
    covered = sum(math.prod(c.sizes) for c in chunks)
    if covered != math.prod(shape):
        raise ValueError(
            f"{key}: chunks cover {covered} of {math.prod(shape)} elements of {tuple(shape)}"
        )


class TorchDistReader:
    """Reads regions of tensors from a torch_dist checkpoint, chunk by chunk."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        metadata_path = self.directory / DCP_METADATA_FILE
        if not metadata_path.is_file():
            raise CheckpointFormatError(
                f"{self.directory} is not a torch_dist checkpoint: {DCP_METADATA_FILE} is missing"
            )
        with open(metadata_path, "rb") as f:
            self.metadata: Metadata = pickle.load(f)
        self._chunks: dict[str, list[tuple[ChunkStorageMetadata, _StorageInfo]]] = {}
        for key, entry in self.metadata.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                self._chunks[key] = [
                    (chunk, self._storage_info(MetadataIndex(key, chunk.offsets)))
                    for chunk in entry.chunks
                ]

    def _storage_info(self, index: MetadataIndex) -> _StorageInfo:
        try:
            info = self.metadata.storage_data[index]
        except KeyError:
            raise CheckpointFormatError(
                f"{self.directory}: no stored data for {index.fqn} at {index.offset}"
            ) from None
        if getattr(info, "transform_descriptors", None):
            raise CheckpointFormatError(
                f"{self.directory}: {index.fqn} is stored with transforms "
                f"{info.transform_descriptors}, which this reader does not undo"
            )
        return info

    def tensor_keys(self) -> dict[str, tuple[Shape, torch.dtype]]:
        return {
            key: (tuple(entry.size), entry.properties.dtype)
            for key, entry in self.metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)
        }

    def object_keys(self) -> list[str]:
        return [
            key
            for key, entry in self.metadata.state_dict_metadata.items()
            if isinstance(entry, BytesStorageMetadata)
        ]

    def _load_record(self, info: _StorageInfo) -> Any:
        with open(self.directory / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) != info.length:
            raise CheckpointFormatError(
                f"{self.directory / info.relative_path}: truncated (wanted {info.length} bytes "
                f"at offset {info.offset})"
            )
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def read_object(self, name: str) -> Any:
        info = self._storage_info(MetadataIndex(name))
        with open(self.directory / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def read(
        self,
        key: str,
        offsets: Sequence[int] | None = None,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of ``key`` (the whole tensor by default)."""
        if key not in self._chunks:
            raise CheckpointFormatError(f"{self.directory}: no tensor {key!r} in the checkpoint")
        entry = self.metadata.state_dict_metadata[key]
        shape = tuple(entry.size)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
        sizes = tuple(sizes) if sizes is not None else shape
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise ValueError(f"{key}: region {offsets}+{sizes} does not match rank of {shape}")
        out = torch.empty(sizes, dtype=entry.properties.dtype)
        filled = 0
        for chunk, info in self._chunks[key]:
            overlap = _intersect(offsets, sizes, tuple(chunk.offsets), tuple(chunk.sizes))
            if overlap is None:
                continue
            lo, hi = overlap
            data = self._load_record(info)
            source = data
            target = out
            for dim, (a, b) in enumerate(zip(lo, hi, strict=True)):
                source = source.narrow(dim, a - chunk.offsets[dim], b - a)
                target = target.narrow(dim, a - offsets[dim], b - a)
            target.copy_(source)
            filled += math.prod(b - a for a, b in zip(lo, hi, strict=True))
            del data, source
        if filled != math.prod(sizes):
            raise CheckpointFormatError(
                f"{self.directory}: stored chunks of {key} cover {filled} of the "
                f"{math.prod(sizes)} elements of region {offsets}+{sizes}"
            )
        return out


def _intersect(
    offsets_a: Shape, sizes_a: Shape, offsets_b: Shape, sizes_b: Shape
) -> tuple[Shape, Shape] | None:
    lo = tuple(max(a, b) for a, b in zip(offsets_a, offsets_b, strict=True))
    hi = tuple(
        min(a + sa, b + sb)
        for a, sa, b, sb in zip(offsets_a, sizes_a, offsets_b, sizes_b, strict=True)
    )
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    return lo, hi
