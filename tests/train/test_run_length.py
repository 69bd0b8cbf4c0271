"""The run's length: a finished run extended by raising train.iterations, runs of no steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_eaft.megatron.launcher import RankError
from megatron_eaft.train.config import ConfigError, config_from_dict
from tests.train import helpers


@pytest.mark.parametrize(
    ("train", "key"), [({"iterations": 0}, "train.iterations"), ({"epochs": 0}, "train.epochs")]
)
def test_a_run_of_no_steps_is_a_config_error(train, key):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"model": {"preset": "tiny-qwen3"}, "data": {"path": "d"}, "train": train})
    assert caught.value.key == key
    assert "got 0" in str(caught.value)


def learning_rates(checkpoint: Path, data: Path, save: Path, *overrides: str):
    """(iteration, learning rate) of every step one fit ran, saving to and resuming from save."""
    from megatron_eaft.train.trainer import run_training

    config = helpers.finetune_config(
        checkpoint,
        data,
        f"checkpoint.save={save}",
        "optimizer.warmup_iterations=null",
        "optimizer.warmup_fraction=0.25",
        *overrides,
    )
    return [(r.iteration, r.learning_rate) for r in run_training(config).records]


def test_extending_a_finished_run_recomputes_the_schedule(
    dist, tiny_checkpoint, packed_dataset, tmp_path
):
    def fit(save: Path, *overrides: str):
        return dist.run(learning_rates, 1, tiny_checkpoint, packed_dataset, save, *overrides)[0]

    run = tmp_path / "run"
    assert [it for it, _ in fit(run, "train.iterations=4")] == [1, 2, 3, 4]
    assert fit(run, "train.iterations=4") == []  # finished: nothing to do
    extended = fit(run, "train.iterations=8")
    # The schedule of an 8-iteration run from the start (warm-up 2 instead of 1), from step 5 on.
    planned = fit(tmp_path / "planned", "train.iterations=8")
    assert extended == planned[4:]

    with pytest.raises(RankError) as caught:
        fit(run, "train.iterations=6")
    assert isinstance(caught.value.exception, ConfigError)
    assert caught.value.exception.key == "train.iterations"
    assert "already at iteration 8" in str(caught.value.exception)

    with pytest.raises(RankError) as caught:
        fit(run, "train.iterations=10", "optimizer.lr=2e-3")
    assert isinstance(caught.value.exception, ConfigError)
    assert caught.value.exception.key == "optimizer.lr"
    assert "was trained with 0.001" in str(caught.value.exception)
