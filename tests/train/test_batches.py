"""Batch order: the same rows per step at any data-parallel size; packed-row attention masks."""

from __future__ import annotations

import pytest
import torch

from megatron_eaft.train.batches import BatchPlan, model_batch, packed_causal_mask


def plan(dp_rank: int = 0, dp: int = 1, micro: int = 2, rows: int = 10) -> BatchPlan:
    return BatchPlan(
        num_rows=rows,
        global_batch_size=8,
        micro_batch_size=micro,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp,
        seed=7,
    )


def test_data_parallel_ranks_split_the_same_global_batch():
    single = plan()
    for step in range(5):
        merged = [
            row for rank in range(2) for mb in plan(rank, 2).microbatch_rows(step) for row in mb
        ]
        assert merged == single.global_rows(step)
        assert [len(mb) for mb in plan(1, 2).microbatch_rows(step)] == [2, 2]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    order = [row for step in range(5) for row in plan().global_rows(step)]  # 40 = 4 epochs
    epochs = [order[i : i + 10] for i in range(0, 40, 10)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert epochs[0] != epochs[1]


def test_batch_that_does_not_split_is_rejected():
    with pytest.raises(ValueError, match="does not split"):
        plan(dp=3)


def test_packed_mask_is_block_diagonal_causal():
    # Two samples (3 and 2 positions) then 3 padding positions, which restart at 0 too.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    mask = packed_causal_mask(position_ids)[0, 0]
    allowed = ~mask
    segment = [0, 0, 0, 1, 1, 2, 2, 2]
    for i in range(8):
        for j in range(8):
            assert allowed[i, j] == (segment[i] == segment[j] and j <= i), (i, j)


def test_model_batch_forms():
    batch = {
        "tokens": torch.arange(8).reshape(2, 4),
        "labels": torch.arange(8).reshape(2, 4),
        "loss_mask": torch.ones(2, 4),
        "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]),
        "cu_seqlens": torch.tensor([0, 2, 4, 8], dtype=torch.int32),
    }
    assert set(model_batch(batch, packed=False, use_thd=False)) == {
        "tokens",
        "labels",
        "loss_mask",
        "position_ids",
    }
    local = model_batch(batch, packed=True, use_thd=False)
    assert local["attention_mask"].shape == (2, 1, 4, 4)
    thd = model_batch(batch, packed=True, use_thd=True)
    assert thd["tokens"].shape == (1, 8) and torch.equal(thd["cu_seqlens"], batch["cu_seqlens"])
