"""On-disk layout of a prepared SFT dataset (shared by the writer and the reader).

A prepared dataset is a directory::

    tokens.bin / tokens.idx        Megatron-Core IndexedDataset of token ids (uint16 when the
                                   vocabulary fits, else int32)
    loss_mask.bin / loss_mask.idx  IndexedDataset of uint8, aligned token for token with tokens:
                                   1 where the token was written by a selected assistant turn
    metadata.json                  seq_length, packing, tokenizer, counts (see `write_metadata`)

In both IndexedDatasets one *sequence* is one sample (a whole tokenised conversation, before
the next-token shift) and one *document* is one training row: the samples packed together
(exactly one in "pad" mode). So `document_indices` give the rows and `sequence_lengths` the
packed boundaries from which the reader builds `cu_seqlens`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from megatron_eaft.outputs import OutputKind, write_json_atomically

FORMAT_NAME = "megatron-eaft-sft"
FORMAT_VERSION = 1
TOKENS_PREFIX = "tokens"
LOSS_MASK_PREFIX = "loss_mask"
METADATA_FILE = "metadata.json"
# What `prepare-data --overwrite` may replace (see megatron_eaft.outputs).
DATASET_OUTPUT = OutputKind(
    "dataset",
    "a dataset made by `prepare-data`",
    ("tokens.bin", "tokens.idx", "loss_mask.bin", "loss_mask.idx", METADATA_FILE),
)


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest index dtype for the vocabulary, as Megatron-Core's GPT dataset chooses it."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **metadata}
    write_json_atomically(directory / METADATA_FILE, payload)


def read_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a dataset made by `megatron-eaft prepare-data`"
        )
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {metadata.get('format')!r} version {metadata.get('version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    for key in ("seq_length", "pad_token_id", "packing"):
        if key not in metadata:
            raise ValueError(f"{path}: missing key {key!r}")
    return metadata
