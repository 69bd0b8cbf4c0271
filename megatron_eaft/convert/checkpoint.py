"""Layout of a converted Megatron checkpoint directory, its metadata, and atomic output.

A converted directory is laid out like Megatron-LM's::

    <root>/latest_checkpointed_iteration.txt   "release" (or an iteration number)
    <root>/release/                            the torch_dist checkpoint (or iter_0000100/ ...)
    <root>/megatron_eaft_model.json            HF config, family, padded vocab, dtype, impl
    <root>/hf/                                 tokenizer + generation files copied from HF

so the model can be rebuilt from the directory alone (``read_model_metadata`` +
``build_gpt_model``) and loaded at any TP/PP/EP with ``dist_checkpointing.load``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
MODEL_METADATA_FILE = "megatron_eaft_model.json"
HF_FILES_DIR = "hf"
METADATA_FORMAT_VERSION = 1
# Files carried over from an HF directory so the exported one is usable as is.
HF_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
REQUIRED_METADATA_KEYS = ("hf_config", "padded_vocab_size", "family", "dtype", "transformer_impl")


class MegatronCheckpointError(ValueError):
    """A Megatron checkpoint directory is not what it should be; the message names the file."""


def iteration_dir_name(iteration: int | str) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def checkpoint_dir(root: str | os.PathLike, iteration: int | str | None = None) -> Path:
    """The torch_dist directory under ``root``: the given iteration, else the tracker's."""
    root = Path(root)
    if iteration is None:
        tracker = root / TRACKER_FILE
        try:
            iteration = tracker.read_text().strip()
        except FileNotFoundError:
            raise MegatronCheckpointError(
                f"{root} is not a Megatron checkpoint directory: {TRACKER_FILE} is missing"
            ) from None
        if iteration != RELEASE and not iteration.isdigit():
            raise MegatronCheckpointError(
                f"{tracker}: expected 'release' or an iteration number, got {iteration!r}"
            )
    path = root / iteration_dir_name(iteration)
    if not path.is_dir():
        raise MegatronCheckpointError(f"{path} does not exist")
    return path


def model_metadata(
    *,
    hf_config: dict[str, Any],
    family: str,
    padded_vocab_size: int,
    make_vocab_size_divisible_by: int,
    dtype: str,
    transformer_impl: str,
    source: str | None = None,
) -> dict[str, Any]:
    return {
        "format_version": METADATA_FORMAT_VERSION,
        "family": family,
        "dtype": dtype,
        "transformer_impl": transformer_impl,
        "padded_vocab_size": padded_vocab_size,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "source": source,
        "hf_config": hf_config,
    }


def write_model_metadata(root: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Write ``megatron_eaft_model.json`` (atomically) into a checkpoint root.

    The trainer calls this for the directories it saves, so they export like converted ones.
    """
    missing = [k for k in REQUIRED_METADATA_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    path = Path(root) / MODEL_METADATA_FILE
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_model_metadata(megatron_ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a converted (or trainer-saved) checkpoint root.

    Returns a dict with at least ``hf_config``, ``padded_vocab_size``, ``family``, ``dtype``,
    ``transformer_impl`` and ``make_vocab_size_divisible_by``.
    """
    if not Path(megatron_ckpt_dir).is_dir():
        raise MegatronCheckpointError(f"{megatron_ckpt_dir} is not a directory")
    path = Path(megatron_ckpt_dir) / MODEL_METADATA_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MegatronCheckpointError(
            f"{path} is missing: {megatron_ckpt_dir} was not written by `megatron-eaft convert "
            "import` (or the trainer), so the model cannot be rebuilt from it"
        ) from None
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MegatronCheckpointError(f"{path}:{exc.lineno}:{exc.colno}: {exc.msg}") from None
    if not isinstance(metadata, dict):
        raise MegatronCheckpointError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_METADATA_KEYS if k not in metadata]
    if missing:
        raise MegatronCheckpointError(f"{path}: missing keys {missing}")
    if metadata.get("format_version", METADATA_FORMAT_VERSION) > METADATA_FORMAT_VERSION:
        raise MegatronCheckpointError(
            f"{path}: format_version {metadata['format_version']} is newer than this code "
            f"understands ({METADATA_FORMAT_VERSION})"
        )
    metadata.setdefault("make_vocab_size_divisible_by", 128)
    return metadata


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy tokenizer / generation files that exist in ``source``; returns their names."""
    copied = []
    for name in HF_SIDE_FILES:
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (best effort: not every filesystem
    lets a directory be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``target``; on success it becomes ``target``.

    The temp name starts with ``.`` and ends in ``.incomplete``, so an interrupted run leaves
    nothing that looks like a finished checkpoint; on an exception it is removed. An existing
    ``target`` is refused unless ``force``, and then replaced only after the new one is done.
    """
    target = Path(target).absolute()
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.incomplete")
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint_into_model(
    model: Any,
    megatron_ckpt_dir: str | os.PathLike,
    *,
    iteration: int | str | None = None,
    allow_missing_extra_state: bool = True,
) -> None:
    """Load a converted checkpoint into a built ``GPTModel`` (any TP/PP/EP layout).

    Every tensor the model asks for must be in the checkpoint and every tensor in the
    checkpoint must be asked for by some rank. Transformer Engine modules can ask for
    ``_extra_state`` entries (FP8 metadata) a converted checkpoint does not hold; with
    ``allow_missing_extra_state`` those, and only those, are skipped and keep fresh values.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = checkpoint_dir(megatron_ckpt_dir, iteration)
    # Megatron's words: "unexpected" = asked for by the model, absent from the checkpoint;
    # "missing" = in the checkpoint, asked for by no rank.
    loaded, in_checkpoint_only, in_model_only = dist_checkpointing.load(
        model.sharded_state_dict(), str(path), strict=StrictHandling.RETURN_ALL
    )
    absent = sorted(
        k for k in in_model_only if not (allow_missing_extra_state and "_extra_state" in k)
    )
    unused = sorted(k for k in in_checkpoint_only if "_extra_state" not in k)
    if absent or unused:
        raise MegatronCheckpointError(
            f"{path} does not match the model: missing from the checkpoint {absent}, "
            f"not used by the model {unused}"
        )
    result = model.load_state_dict(loaded, strict=True)
    leftovers = [k for k in result.missing_keys if "_extra_state" not in k]
    if leftovers or result.unexpected_keys:
        raise MegatronCheckpointError(
            f"{path}: loading left parameters unset {leftovers} / unknown {result.unexpected_keys}"
        )
