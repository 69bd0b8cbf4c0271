"""`megatron-eaft finetune` with eaft.fused_output: three steps give the unfused run's losses,
also when the loss sits on the last of two pipeline stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train import helpers


def three_steps(checkpoint: Path, data: Path, overrides: list[str]) -> list[dict]:
    from megatron_eaft.train.trainer import Trainer

    trainer = Trainer(helpers.finetune_config(checkpoint, data, *overrides))
    try:
        return [
            {"reports": record.reports, "grad_norm": record.grad_norm}
            for record in trainer.fit().records
        ]
    finally:
        trainer.close()


@pytest.mark.parametrize(("world", "layout"), [(1, []), (2, ["parallel.pipeline=2"])])
def test_three_fused_steps_give_the_unfused_losses(
    dist, tiny_checkpoint, packed_dataset, world, layout
):
    # 64-token rows, micro-batch 1: chunks of 24 tokens do not divide them.
    fused_overrides = ["eaft.fused_output=true", "eaft.fused_chunk_tokens=24", *layout]
    unfused = dist.run(three_steps, world, tiny_checkpoint, packed_dataset, layout)[-1]
    fused = dist.run(three_steps, world, tiny_checkpoint, packed_dataset, fused_overrides)[-1]
    assert len(fused) == len(unfused) == 3
    for step, (got, expected) in enumerate(zip(fused, unfused, strict=True), start=1):
        assert set(got["reports"]) == set(expected["reports"]), step
        for key, (total, count) in expected["reports"].items():
            assert got["reports"][key][1] == count, (step, key)
            assert got["reports"][key][0] == pytest.approx(total, rel=1e-5, abs=1e-6), (step, key)
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), step
