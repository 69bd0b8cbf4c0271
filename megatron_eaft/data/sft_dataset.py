"""Reader for datasets written by `megatron-eaft prepare-data`: one packed row per item.

Stored (see `megatron_eaft.data.layout`): per sample, its full token ids ``t_0 .. t_{n-1}`` and
a mask ``m_0 .. m_{n-1}`` (1 where an assistant turn wrote the token); samples grouped into rows.

Each row becomes ``seq_length`` positions. The shift is done per sample, as Megatron-Bridge's
packed SFT batches do, so no position ever predicts the first token of the next sample: a
sample of n tokens fills n - 1 positions with

    tokens[p]       = t_j          (j = 0 .. n-2)
    labels[p]       = t_{j+1}      (the next token: what position p is trained to predict)
    loss_mask[p]    = m_{j+1}      (aligned with labels, as in Megatron-Core's GPTDataset)
    position_ids[p] = j            (restarting at 0 for every sample)

Samples follow each other; the rest of the row is padding (token and label = the pad id from
metadata.json, loss_mask 0, position ids restarting at 0). `cu_seqlens` (int32) are the
cumulative boundaries of the samples and, when the row is not full, of the padding as one
trailing pseudo-sequence, so ``cu_seqlens[-1] == seq_length`` always: exactly the THD layout
Megatron-Core's `PackedSeqParams` / Transformer Engine expect. A "pad" dataset (one sample per
row) gives the same tensors with one sample per row; its rows can be fed as plain causal
sequences and `cu_seqlens` ignored.

Item (one row)::

    tokens        int64   [s]
    labels        int64   [s]
    loss_mask     float32 [s]
    position_ids  int64   [s]
    cu_seqlens    int32   [k + 1]   k = samples in the row (+1 if padded)
    max_seqlen    int             longest of those k segments

`collate_sft_rows` stacks b rows into [b, s] tensors and concatenates their boundaries into one
`cu_seqlens` for the micro-batch viewed as a single [1, b*s] THD sequence (row r's boundaries
offset by r*s), with `max_seqlen` the largest over the micro-batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_eaft.data.layout import LOSS_MASK_PREFIX, TOKENS_PREFIX, read_metadata


class SFTDataset(torch.utils.data.Dataset):
    """Packed SFT rows from a `prepare-data` output directory (memory-mapped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.path = Path(path)
        self.metadata: dict[str, Any] = read_metadata(self.path)
        self.seq_length: int = int(self.metadata["seq_length"])
        self.pad_token_id: int = int(self.metadata["pad_token_id"])
        for prefix in (TOKENS_PREFIX, LOSS_MASK_PREFIX):
            if not IndexedDataset.exists(str(self.path / prefix)):
                raise FileNotFoundError(f"{self.path / prefix}.bin/.idx not found")
        self._tokens = IndexedDataset(str(self.path / TOKENS_PREFIX))
        self._loss_mask = IndexedDataset(str(self.path / LOSS_MASK_PREFIX))
        if not (
            np.array_equal(self._tokens.sequence_lengths, self._loss_mask.sequence_lengths)
            and np.array_equal(self._tokens.document_indices, self._loss_mask.document_indices)
        ):
            raise ValueError(f"{self.path}: tokens and loss_mask datasets do not line up")
        self._row_starts = self._tokens.document_indices

    def __len__(self) -> int:
        return len(self._row_starts) - 1

    def sample_lengths(self, row: int) -> np.ndarray:
        """Token counts of the samples packed into a row (before the shift)."""
        return self._tokens.sequence_lengths[self._row_starts[row] : self._row_starts[row + 1]]

    def __getitem__(self, row: int) -> dict[str, Any]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        first, last = int(self._row_starts[row]), int(self._row_starts[row + 1])
        samples = self._tokens[first:last]
        masks = self._loss_mask[first:last]
        length = self.seq_length
        tokens = np.full(length, self.pad_token_id, dtype=np.int64)
        labels = np.full(length, self.pad_token_id, dtype=np.int64)
        loss_mask = np.zeros(length, dtype=np.float32)
        position_ids = np.zeros(length, dtype=np.int64)
        boundaries = [0]
        for sample, mask in zip(samples, masks, strict=True):
            start, positions = boundaries[-1], len(sample) - 1
            end = start + positions
            if end > length:
                raise ValueError(
                    f"{self.path}: row {row} holds {end} positions, more than seq_length {length}"
                )
            tokens[start:end] = sample[:-1]
            labels[start:end] = sample[1:]
            loss_mask[start:end] = mask[1:]
            position_ids[start:end] = np.arange(positions)
            boundaries.append(end)
        if boundaries[-1] < length:
            position_ids[boundaries[-1] :] = np.arange(length - boundaries[-1])
            boundaries.append(length)
        cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        }


def collate_sft_rows(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Micro-batch of rows: [b, s] tensors plus micro-batch-wide THD boundaries.

    Returns tokens/labels/position_ids int64 [b, s], loss_mask float32 [b, s], cu_seqlens
    int32 [sum(k_r) + 1] for the rows laid end to end, and max_seqlen int32 (0-dim).
    """
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    batch = {
        key: torch.stack([row[key] for row in rows])
        for key in ("tokens", "labels", "loss_mask", "position_ids")
    }
    length = batch["tokens"].shape[1]
    boundaries = [torch.zeros(1, dtype=torch.int32)]
    for index, row in enumerate(rows):
        boundaries.append(row["cu_seqlens"][1:] + index * length)
    batch["cu_seqlens"] = torch.cat(boundaries).to(torch.int32)
    batch["max_seqlen"] = torch.tensor(max(row["max_seqlen"] for row in rows), dtype=torch.int32)
    return batch
