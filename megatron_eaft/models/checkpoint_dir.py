"""The layout of a Megatron checkpoint directory, shared by conversion and training.

A checkpoint root is laid out like Megatron-LM's::

    <root>/latest_checkpointed_iteration.txt   "release" or an iteration number: the last
                                               COMPLETE checkpoint
    <root>/release/  or  <root>/iter_0000100/  the torch_dist checkpoint(s)
    <root>/megatron_eaft_model.json            the model description (models.metadata)
    <root>/hf/                                 tokenizer + generation files copied from HF

An iteration directory is written as ``.iter_0000100.incomplete`` and renamed into place
before the tracker names it, so a save killed at any moment leaves the tracker naming the
previous complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_eaft.outputs import INCOMPLETE_SUFFIX, fsync_dir, replace_dir, write_text_atomically

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
HF_FILES_DIR = "hf"
# The common-state key that marks a checkpoint saved by megatron-eaft's trainer: its model
# weights sit under "model" next to optimizer state; converted checkpoints hold weights only.
TRAINING_STATE_KEY = "megatron_eaft_trainer"
# The common-state key Megatron-Bridge's trainer saves (its checkpoint format version).
BRIDGE_TRAINING_STATE_KEY = "checkpoint_version"

Iteration = int | str  # an iteration number, or RELEASE


class MegatronCheckpointError(ValueError):
    """A Megatron checkpoint directory is not what it should be; the message names the file."""


def iteration_dir_name(iteration: Iteration) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def incomplete_dir(root: str | os.PathLike, iteration: Iteration) -> Path:
    """Where a save of ``iteration`` is written before it is published."""
    return Path(root) / f".{iteration_dir_name(iteration)}{INCOMPLETE_SUFFIX}"


def read_tracker(root: str | os.PathLike | None) -> Iteration | None:
    """The tracker's iteration (an int, or "release"), or None when ``root`` has no tracker."""
    if root is None:
        return None
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text(encoding="utf-8").strip()
    if text == RELEASE:
        return RELEASE
    if not text.isdigit():
        raise MegatronCheckpointError(
            f"{tracker}: expected 'release' or an iteration number, got {text!r}"
        )
    return int(text)


def checkpoint_dir(root: str | os.PathLike, iteration: Iteration | None = None) -> Path:
    """The torch_dist directory under ``root``: the given iteration, else the tracker's."""
    root = Path(root)
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            raise MegatronCheckpointError(
                f"{root} is not a Megatron checkpoint directory: {TRACKER_FILE} is missing"
            )
    path = root / iteration_dir_name(iteration)
    if not path.is_dir():
        raise MegatronCheckpointError(f"{path} does not exist")
    return path


def publish_iteration(root: str | os.PathLike, iteration: Iteration) -> Path:
    """Rename the finished ``incomplete_dir`` into place, then point the tracker at it.

    Re-saving an iteration (a resumed run stopping at the same step) replaces it.
    """
    root = Path(root)
    final = root / iteration_dir_name(iteration)
    staged = incomplete_dir(root, iteration)
    fsync_dir(staged)
    replace_dir(staged, final)
    write_text_atomically(root / TRACKER_FILE, f"{iteration}\n")
    return final


def remove_incomplete(root: str | os.PathLike) -> list[Path]:
    """Delete iteration directories a killed save left behind (call on one rank)."""
    root = Path(root)
    if not root.is_dir():
        return []
    leftovers = [
        p
        for p in root.iterdir()
        if p.name.startswith(".iter_") and p.name.endswith(INCOMPLETE_SUFFIX) and p.is_dir()
    ]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers
