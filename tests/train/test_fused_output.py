"""`megatron-eaft finetune` with eaft.fused_output: three steps give the unfused run's losses,
with the gradients recomputed in backward or formed in the forward pass (fused_gradient), also
when the loss sits on the last of two pipeline stages."""

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
    helpers.assert_same_steps(fused, unfused)
    formed_overrides = [*fused_overrides, "eaft.fused_gradient=forward"]
    formed = dist.run(three_steps, world, tiny_checkpoint, packed_dataset, formed_overrides)[-1]
    helpers.assert_same_steps(formed, unfused)
