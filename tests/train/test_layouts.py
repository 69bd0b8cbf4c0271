"""One EAFT training step through the trainer: the same loss and gradients at every layout.

Weights come from a tiny Qwen3 converted by `convert import`, so every layout starts from the
same model; the data is packed rows (block-diagonal attention on the local layers). The newer
families (Qwen3.5, Qwen3.5-MoE, GLM-4.7-Flash) take the same step on unpacked rows at TP2 / PP2
(and EP2 with MoE), then a short saved `finetune` run that `convert export` gives back to
transformers. Gradients are compared whole, by checkpoint key, reassembled from every rank.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.train import helpers

LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)]  # (tensor, pipeline, data)


GradientPiece = tuple[str, tuple[int, ...], tuple, torch.Tensor]


def gradient_pieces(model) -> list[GradientPiece]:
    """This rank's share of every parameter's gradient (main_grad), placed in the global
    tensors of the model's checkpoint: (key, global shape, global slice, values).

    The placement is the model's own ``sharded_state_dict`` (what a checkpoint save and load
    use) with each parameter's data swapped for its gradient, so TP shards, interleaved
    tensors (fc1 [gate; up], Gated DeltaNet's in_proj and conv1d sections), experts under EP
    and layers under PP all land by global name without a per-family rule. Replicas
    (DP, TP-replicated norms) are left to their main copy.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        apply_factories,
        is_main_replica,
    )

    params = list(model.parameters())
    weights = [param.data for param in params]
    storages = {param.main_grad.untyped_storage().data_ptr() for param in params}
    for param in params:
        param.data = param.main_grad
    try:
        state = model.sharded_state_dict()
        apply_factories(state)
        pieces = [
            (item.key, tuple(item.global_shape), item.global_slice(), item.data.detach().clone())
            for item in nested_values(state)
            if isinstance(item, ShardedTensor)
            and is_main_replica(item.replica_id)
            and item.data.untyped_storage().data_ptr() in storages
        ]
    finally:
        for param, weight in zip(params, weights, strict=True):
            param.data = weight
    return pieces


def assemble_gradients(pieces: list[GradientPiece]) -> dict[str, torch.Tensor]:
    """Full gradients by checkpoint key from every rank's pieces; each must be covered."""
    grads: dict[str, torch.Tensor] = {}
    for key, shape, where, values in pieces:
        grad = grads.setdefault(key, torch.full(shape, float("nan")))
        grad[where] = values.reshape(grad[where].shape)
    uncovered = [key for key, grad in grads.items() if grad.isnan().any()]
    assert not uncovered, f"no rank holds part of the gradient of {uncovered}"
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
            "grads": gradient_pieces(trainer.model) if gradients else None,
            "decoder_layers": len(trainer.model.decoder.layers),
        }
    finally:
        trainer.close()


def merged_gradients(results: list[dict]) -> dict[str, torch.Tensor]:
    return assemble_gradients([piece for result in results for piece in result["grads"]])


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
    expected = merged_gradients([reference])
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
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
    ours_grads, megatron_grads = merged_gradients(ours), merged_gradients(megatron)
    assert ours_grads.keys() == megatron_grads.keys()
    for name, grad in megatron_grads.items():
        assert torch.equal(ours_grads[name], grad), name


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
    packed_grads = merged_gradients([runs["packed"]])
    for name, grad in merged_gradients([runs["padded"]]).items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


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


# -- the newer families: Gated DeltaNet, MLA, MoE ---------------------------------------------

# Each family's two-rank layouts (compared with its TP1 step). MoE layers train at TP > 1 only
# with sequence parallelism; EP2 spreads the experts over the two data-parallel ranks.
_EXPERT_PARALLEL = ["parallel.expert=2", *layout_overrides(1, 1, 2)]
_SEQUENCE_PARALLEL_TP2 = ["parallel.tensor=2", "parallel.sequence_parallel=true"]
FAMILY_LAYOUTS: dict[str, dict[str, list[str]]] = {
    "qwen3_5": {"TP2": ["parallel.tensor=2"], "PP2": ["parallel.pipeline=2"]},
    "qwen3_5_moe": {
        "TP2-SP": _SEQUENCE_PARALLEL_TP2,
        # The fused output layer under sequence parallelism inside the whole GPTModel (its
        # input all-gathered, reduce-scattered back), 24-token chunks not dividing the rows.
        "TP2-SP-fused": [
            *_SEQUENCE_PARALLEL_TP2,
            "eaft.fused_output=true",
            "eaft.fused_chunk_tokens=24",
        ],
        "PP2": ["parallel.pipeline=2"],
        # Uneven stages (1 + 3 layers), as GLM-4.7-Flash's 47 layers need for any PP.
        "PP2-uneven": ["parallel.pipeline=2", "parallel.first_stage_layers=1"],
        "EP2": _EXPERT_PARALLEL,
    },
    "glm4_moe_lite": {
        "TP2-SP": _SEQUENCE_PARALLEL_TP2,
        "PP2": ["parallel.pipeline=2"],
        "EP2": _EXPERT_PARALLEL,
    },
}
FAMILY_VOCAB = 200  # the tiny models of tests/qwen3_5, tests/qwen3_5_moe, tests/glm4_moe_lite
# Gradients agree to ~1e-5 of each tensor's largest entry (fp32; Gated DeltaNet's chunked
# recurrence at TP2 is the loosest); a missing TP reduction shows as 1e-2 or more.
GRAD_RTOL = 1e-4
FINETUNE_LAYOUT = ["parallel.pipeline=2"]


def layouts_then_finetune(
    checkpoint: Path, data: Path, layouts: list[list[str]], finetune: Path, save: Path
) -> dict:
    """Rank function: one EAFT step at each layout, then a 3-step run on ``finetune`` (4 rows,
    every step the same global batch) saved to ``save``, and the saved model's logits."""
    from megatron_eaft.convert import verify
    from megatron_eaft.train.trainer import run_training

    steps = [train_one_step(checkpoint, data, overrides, True) for overrides in layouts]
    config = helpers.finetune_config(
        checkpoint,
        finetune,
        "data.shuffle=false",
        f"checkpoint.save={save}",
        *FINETUNE_LAYOUT,
    )
    result = run_training(config)
    input_ids = verify.sample_inputs(FAMILY_VOCAB, batch=2, seq_len=12, seed=5)
    return {
        "steps": steps,
        # Reports come from the last pipeline stage, logits to global rank 0.
        "losses": [record.reports.get("lm loss") for record in result.records],
        "logits": verify.megatron_logits(str(save), input_ids, 1, 2),
        "input_ids": input_ids,
    }


@pytest.fixture(scope="module")
def family_runs(dist, tmp_path_factory):
    """family -> its TP1 step and its two-rank job (every layout + the fine-tuning run),
    computed on first use: one one-rank and one two-rank pool job per family."""
    from megatron_eaft.train.preflight import preflight

    runs: dict[str, dict] = {}

    def run(family: str) -> dict:
        if family not in runs:
            root = tmp_path_factory.mktemp(family)
            checkpoint = helpers.converted_family_checkpoint(root, family)
            # Unpacked rows: Gated DeltaNet cannot keep packed samples apart on CPU.
            data = helpers.write_sft_dataset(root / "data", packing="pad", vocab=FAMILY_VOCAB)
            finetune = helpers.write_sft_dataset(
                root / "finetune",
                packing="pad",
                samples=helpers.random_samples(4, seed=11, vocab=FAMILY_VOCAB),
                vocab=FAMILY_VOCAB,
            )
            layouts = FAMILY_LAYOUTS[family]
            for overrides in layouts.values():  # what `finetune` checks before starting ranks
                preflight(helpers.finetune_config(checkpoint, data, *overrides))
            reference = dist.run(train_one_step, 1, checkpoint, data, [], True)[0]
            job = dist.run(
                layouts_then_finetune,
                2,
                checkpoint,
                data,
                list(layouts.values()),
                finetune,
                root / "run",
            )
            runs[family] = {
                "reference": reference,
                "layouts": {
                    name: [rank["steps"][index] for rank in job]
                    for index, name in enumerate(layouts)
                },
                "finetune": {
                    "losses": [total / count for total, count in job[-1]["losses"]],
                    "logits": job[0]["logits"],
                    "input_ids": job[0]["input_ids"],
                },
                "save": root / "run",
            }
        return runs[family]

    return run


# Each family's pair of jobs costs 25-65 s on the 2 CPU cores here (measured: qwen3_5 the most,
# Gated DeltaNet at TP2 without SP; qwen3_5_moe ~45 s, glm4_moe_lite ~26 s), more than the
# default suite can take for all three: qwen3_5_moe stays in it (Gated DeltaNet and MoE at TP2
# with SP, PP2, EP2), the others run with `make test-slow`.
SLOW_FAMILIES = {"qwen3_5", "glm4_moe_lite"}


def _family_param(family: str, *values: str) -> object:
    marks = [pytest.mark.slow] if family in SLOW_FAMILIES else []
    return pytest.param(family, *values, marks=marks, id="-".join((family, *values)))


@pytest.mark.parametrize(
    ("family", "layout"),
    [
        _family_param(family, layout)
        for family, layouts in FAMILY_LAYOUTS.items()
        for layout in layouts
    ],
)
def test_family_eaft_step_matches_tp1(family_runs, family, layout):
    """Same losses, grad norm and reassembled gradients as the family's TP1 step."""
    runs = family_runs(family)
    reference, results = runs["reference"], runs["layouts"][layout]
    if layout == "PP2-uneven":
        assert [rank["decoder_layers"] for rank in results] == [1, 3]
    last = results[-1]
    helpers.assert_same_reports(last["reports"], reference["reports"], layout)
    assert last["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    grads, expected = merged_gradients(results), merged_gradients([reference])
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(
            grads[name], grad, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale, msg=name
        )


@pytest.mark.parametrize("family", [_family_param(family) for family in FAMILY_LAYOUTS])
def test_family_finetune_lowers_the_loss_and_exports_to_transformers(family_runs, family, tmp_path):
    """Three steps on one repeated batch (the first at warm-up LR 0) at PP2, saved; `convert
    export` of the saved run loads in transformers and gives the trained model's logits."""
    from megatron_eaft.convert import verify
    from megatron_eaft.convert.engine import export_megatron_checkpoint

    runs = family_runs(family)
    finetune = runs["finetune"]
    first, second, third = finetune["losses"]
    assert all(math.isfinite(loss) for loss in finetune["losses"])
    assert second == pytest.approx(first, rel=1e-6)  # nothing moved at LR 0
    assert third < second
    out = tmp_path / "hf"
    export_megatron_checkpoint(runs["save"], out, progress=False, fsync=False)
    comparison = verify.compare_logits(
        verify.hf_logits(out, finetune["input_ids"]), finetune["logits"]
    )
    assert comparison.max_abs_diff <= 1e-4 and comparison.top1_agreement == 1.0, comparison.line()
