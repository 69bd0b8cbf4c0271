"""One EAFT training step through the trainer: the same loss and gradients at every layout.

Weights come from a tiny Qwen3 converted by `convert import`, so every layout starts from the
same model; the data is packed rows (block-diagonal attention on the local layers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train import helpers

LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)]  # (tensor, pipeline, data)


def _global_name(name: str, pp_rank: int, layers_per_stage: int) -> str:
    parts = name.split(".")
    if "layers" in parts:
        index = parts.index("layers") + 1
        parts[index] = str(int(parts[index]) + pp_rank * layers_per_stage)
    return ".".join(parts)


def full_gradients(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (main_grad) reassembled from its TP shards, by global name."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    layers_per_stage = model.config.num_layers // ps.get_pipeline_model_parallel_world_size()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.main_grad.detach().clone()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(shards, grad, group=ps.get_tensor_model_parallel_group())
            dim = param.partition_dim
            if name.endswith("linear_fc1.weight"):  # each rank holds [gate_r; up_r]
                halves = [shard.chunk(2, dim=dim) for shard in shards]
                grad = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
            else:
                grad = torch.cat(shards, dim=dim)
        grads[_global_name(name, pp_rank, layers_per_stage)] = grad
    return grads


def train_one_step(checkpoint: Path, data: Path, overrides: list[str], gradients: bool) -> dict:
    from megatron_eaft.train.trainer import Trainer

    config = helpers.finetune_config(checkpoint, data, "train.iterations=1", *overrides)
    trainer = Trainer(config)
    try:
        record = trainer.fit().records[0]
        return {
            "reports": record.reports,
            "grad_norm": record.grad_norm,
            "grads": full_gradients(trainer.model) if gradients else None,
        }
    finally:
        trainer.close()


def merged_gradients(results: list[dict]) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}
    for result in results:
        grads.update(result["grads"])
    return grads


def layout_overrides(tp: int, pp: int, dp: int) -> list[str]:
    # DP ranks hold the full reduced gradient only without the distributed optimizer.
    return [
        f"parallel.tensor={tp}",
        f"parallel.pipeline={pp}",
        f"parallel.distributed_optimizer={'false' if dp > 1 else 'true'}",
    ]


@pytest.fixture(scope="module")
def reference(dist, tiny_checkpoint, packed_dataset):
    return dist.run(train_one_step, 1, tiny_checkpoint, packed_dataset, [], True)[0]


@pytest.mark.parametrize(("tp", "pp", "dp"), LAYOUTS, ids=lambda v: str(v))
def test_eaft_step_matches_tp1(dist, tiny_checkpoint, packed_dataset, reference, tp, pp, dp):
    results = dist.run(
        train_one_step,
        tp * pp * dp,
        tiny_checkpoint,
        packed_dataset,
        layout_overrides(tp, pp, dp),
        True,
    )
    last = results[-1]
    assert (
        set(last["reports"])
        == set(reference["reports"])
        >= {
            "lm loss",
            "eaft loss",
            "eaft/mean_weight",
            "eaft/mean_entropy",
            "eaft/confident_conflict_frac",
        }
    )
    for key, (total, count) in reference["reports"].items():
        assert last["reports"][key][1] == count, key
        assert last["reports"][key][0] == pytest.approx(total, rel=1e-5, abs=1e-6), key
    assert last["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    grads = merged_gradients(results)
    assert grads.keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("tp", [1, 2])
def test_kind_sft_is_megatrons_loss_exactly(dist, tiny_checkpoint, packed_dataset, tp):
    """kind sft through the EAFT kernel (diagnostics on) vs Megatron's untouched CE."""
    ours = dist.run(
        train_one_step,
        tp,
        tiny_checkpoint,
        packed_dataset,
        [f"parallel.tensor={tp}", "eaft.kind=sft", "eaft.diagnostics=true"],
        True,
    )
    megatron = dist.run(
        train_one_step,
        tp,
        tiny_checkpoint,
        packed_dataset,
        [f"parallel.tensor={tp}", "eaft.kind=sft", "eaft.diagnostics=false"],
        True,
    )
    for rank_ours, rank_megatron in zip(ours, megatron, strict=True):
        assert rank_ours["reports"]["lm loss"] == rank_megatron["reports"]["lm loss"]
        assert rank_ours["reports"]["eaft loss"] == rank_megatron["reports"]["lm loss"]
        assert rank_ours["grad_norm"] == rank_megatron["grad_norm"]
        for name, grad in rank_megatron["grads"].items():
            assert torch.equal(rank_ours["grads"][name], grad), name


def test_packed_rows_equal_one_sample_per_row(dist, tiny_checkpoint, tmp_path):
    """The same 8 samples packed 2 per row or padded 1 per row: same loss and gradients."""
    samples = helpers.random_samples(8, seed=3, min_length=25, max_length=33)
    packed = helpers.write_sft_dataset(tmp_path / "packed", packing="first-fit", samples=samples)
    padded = helpers.write_sft_dataset(tmp_path / "padded", packing="pad", samples=samples)
    from megatron_eaft.data.sft_dataset import SFTDataset

    assert (len(SFTDataset(packed)), len(SFTDataset(padded))) == (4, 8)
    runs = {
        name: dist.run(
            train_one_step, 1, tiny_checkpoint, path, [f"data.global_batch_size={rows}"], True
        )[0]
        for name, path, rows in (("packed", packed, 4), ("padded", padded, 8))
    }
    for key, (total, count) in runs["padded"]["reports"].items():
        assert runs["packed"]["reports"][key][1] == count, key
        assert runs["packed"]["reports"][key][0] == pytest.approx(total, rel=1e-5, abs=1e-6), key
    for name, grad in runs["padded"]["grads"].items():
        torch.testing.assert_close(
            runs["packed"]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name
        )


def test_moe_step_matches_across_expert_parallel(dist, tmp_path_factory, packed_dataset):
    """Tiny Qwen3-MoE: expert parallel 2 over the data-parallel ranks equals EP 1."""
    checkpoint = helpers.converted_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_moe"), **helpers.TINY_MOE
    )
    common = ["parallel.distributed_optimizer=false"]
    single = dist.run(train_one_step, 2, checkpoint, packed_dataset, common, True)
    expert = dist.run(
        train_one_step, 2, checkpoint, packed_dataset, [*common, "parallel.expert=2"], False
    )
    for key, (total, count) in single[-1]["reports"].items():
        assert expert[-1]["reports"][key][1] == count, key
        assert expert[-1]["reports"][key][0] == pytest.approx(total, rel=1e-5, abs=1e-6), key
    assert expert[-1]["grad_norm"] == pytest.approx(single[-1]["grad_norm"], rel=1e-5)


def eval_after_first_step(
    checkpoint: Path, data: Path, general: Path, out: Path
) -> tuple[dict, float, float, str]:
    import contextlib
    import io
    import os
    from unittest import mock

    from megatron_eaft.train.trainer import run_training

    config = helpers.finetune_config(
        checkpoint,
        data,
        "train.iterations=2",  # warm-up 1: the first step's learning rate is 0
        f"data.eval_path={data}",
        f"eval.sets.general={general}",
        "data.shuffle=false",
        "eval.interval=1",
        "eval.iterations=1",
        f"logging.metrics_file={out / 'metrics.jsonl'}",
        f"logging.tensorboard_dir={out / 'tb'}",
        "logging.wandb_project=eaft-tests",
        "logging.wandb_run_name=named-eval-sets",
        "logging.wandb_offline=true",
    )
    # This worker process serves later tests: patch.dict restores its environment.
    console = io.StringIO()
    with (
        mock.patch.dict(os.environ, WANDB_DIR=str(out), WANDB_SILENT="true"),
        contextlib.redirect_stdout(console),
    ):
        result = run_training(config)
    record = result.records[0]
    assert result.eval_losses == {i: result.evaluations[i][""]["lm loss"] for i in (1, 2)}
    return (
        result.evaluations,
        record.value("lm loss"),
        record.value("eaft loss"),
        console.getvalue(),
    )


def test_named_evaluation_sets_report_plain_cross_entropy_everywhere(
    dist, tiny_checkpoint, packed_dataset, tmp_path
):
    """The first step runs at warm-up LR 0, so evaluating the same rows after it must give
    that step's unweighted CE (not the EAFT-weighted loss). A second, named set reports its own
    loss and EAFT statistics, under its name, on TensorBoard, the JSONL metrics and W&B."""
    from megatron_eaft.diagnostics.run_logs import read_metrics_jsonl, read_tensorboard

    general = helpers.write_sft_dataset(
        tmp_path / "general", packing="pad", samples=helpers.random_samples(8, seed=7)
    )
    evaluations, lm_loss, eaft_loss, console = dist.run(
        eval_after_first_step, 1, tiny_checkpoint, packed_dataset, general, tmp_path
    )[0]
    domain = evaluations[1][""]
    assert domain["lm loss"] == pytest.approx(lm_loss, rel=1e-6)
    assert abs(eaft_loss - lm_loss) > 1e-3
    assert set(evaluations[1]) == {"", "general"}
    statistics = ("lm loss", "eaft loss", "eaft/mean_entropy", "eaft/confident_conflict_frac")
    assert set(statistics) <= set(evaluations[1]["general"])
    assert abs(evaluations[1]["general"]["lm loss"] - domain["lm loss"]) > 1e-3
    general_line = (
        f"eval at iteration 2 [general]: lm loss {evaluations[2]['general']['lm loss']:.6E}"
    )
    assert general_line in console and "eval at iteration 2: lm loss " in console
    assert "eaft/mean_entropy" in console.split("[general]")[-1].splitlines()[0]

    tags = {
        (name, key): f"eval/{name}/{key}" if name else f"eval/{key}"
        for name in ("", "general")
        for key in statistics
    }
    jsonl = read_metrics_jsonl(tmp_path / "metrics.jsonl")
    tensorboard = read_tensorboard(tmp_path / "tb")
    history = helpers.wandb_offline_history(tmp_path)
    assert history["run"] == {"project": "eaft-tests", "display_name": "named-eval-sets"}
    for iteration in (1, 2):
        for (name, key), tag in tags.items():
            value = evaluations[iteration][name][key]
            assert dict(jsonl[tag])[iteration] == pytest.approx(value), tag
            assert dict(tensorboard[tag])[iteration] == pytest.approx(value, rel=1e-6), tag
            assert history["steps"][iteration][tag] == pytest.approx(value), tag
    assert "eval/general/lm loss ppl" in tensorboard
    # W&B has TensorBoard's keys (less the "vs samples" axis, a key of its own there).
    logged = {key for row in history["steps"].values() for key in row}
    assert {key for key in tensorboard if not key.endswith(" vs samples")} <= logged
    assert history["steps"][2]["consumed-samples"] == 8
