"""Which dataset rows each step and rank trains on, and how a micro-batch reaches the model.

Order: the dataset rows in a fresh seeded permutation per epoch, laid end to end. Global batch
``k`` is positions ``[k * G, (k + 1) * G)`` of that order; data-parallel rank ``r`` takes the
``r``-th contiguous slice of ``G / DP`` rows and cuts it into micro-batches. So a step trains on
the same rows at any TP/PP/DP layout (the losses of different layouts compare), and the data
position of a run is its iteration count: resuming at iteration ``k`` continues exactly where an
uninterrupted run would be. Every rank of a model-parallel group reads the same rows itself
(the rows are memory-mapped), so no batch is broadcast.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from megatron_eaft.data.sft_dataset import collate_sft_rows


@dataclass(frozen=True)
class BatchPlan:
    """Rows of global batch ``step`` for one data-parallel rank, as micro-batches."""

    num_rows: int
    global_batch_size: int
    micro_batch_size: int
    data_parallel_rank: int
    data_parallel_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise ValueError("the dataset has no rows")
        per_rank, remainder = divmod(self.global_batch_size, self.data_parallel_size)
        if remainder or per_rank % self.micro_batch_size:
            raise ValueError(
                f"global batch {self.global_batch_size} does not split into micro-batches of "
                f"{self.micro_batch_size} over {self.data_parallel_size} data-parallel ranks"
            )

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.data_parallel_size * self.micro_batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return _epoch_order(self.num_rows, self.seed, epoch, self.shuffle)

    def global_rows(self, step: int) -> list[int]:
        """The ``global_batch_size`` rows of optimizer step ``step`` (0-based), all ranks."""
        start = step * self.global_batch_size
        rows = []
        for position in range(start, start + self.global_batch_size):
            epoch, offset = divmod(position, self.num_rows)
            rows.append(int(self.epoch_order(epoch)[offset]))
        return rows

    def microbatch_rows(self, step: int) -> list[list[int]]:
        rows = self.global_rows(step)
        per_rank = self.global_batch_size // self.data_parallel_size
        mine = rows[self.data_parallel_rank * per_rank : (self.data_parallel_rank + 1) * per_rank]
        size = self.micro_batch_size
        return [mine[i : i + size] for i in range(0, per_rank, size)]


@cache
def _epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def microbatches(dataset: Any, rows: Sequence[Sequence[int]]) -> Iterator[dict[str, Any]]:
    for micro_rows in rows:
        yield collate_sft_rows([dataset[row] for row in micro_rows])


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] index of the packed sample each position belongs to (positions restart at 0)."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] Megatron attention mask (True = masked) for packed rows.

    A position attends to earlier positions of its own sample only: the block-diagonal causal
    mask that Transformer Engine's THD path applies through cu_seqlens, for Megatron-Core's
    local attention, which takes no cu_seqlens. RoPE is relative, so the un-restarted rotary
    positions inside a row give the same scores as restarted ones.
    """
    segments = segment_ids(position_ids)
    length = position_ids.shape[-1]
    same_sample = segments.unsqueeze(-1) == segments.unsqueeze(-2)
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ~(same_sample & causal).unsqueeze(1)


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def model_batch(batch: dict[str, Any], *, packed: bool, use_thd: bool) -> dict[str, Any]:
    """The micro-batch as the forward step hands it to GPTModel.

    Unpacked rows (one sample + padding: a "pad" dataset) keep Megatron's causal mask. Packed
    rows go as THD when the attention takes it (Transformer Engine): the micro-batch viewed as
    one [1, b*s] sequence with the micro-batch-wide ``cu_seqlens``; else as [b, s] rows with a
    block-diagonal causal ``attention_mask`` (Megatron-Core's local attention).
    """
    out = {key: batch[key] for key in ("tokens", "labels", "loss_mask", "position_ids")}
    if not packed:
        return out
    if use_thd:
        out = {key: value.reshape(1, -1) for key, value in out.items()}
        out["cu_seqlens"] = batch["cu_seqlens"]
    else:
        out["attention_mask"] = packed_causal_mask(batch["position_ids"])
    return out
