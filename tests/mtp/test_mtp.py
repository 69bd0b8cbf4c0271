"""Multi-token prediction (MTP) converted both ways, for Qwen3.5 (dense and MoE) and GLM-4.7-Flash,
and its losses under ``eaft.mtp``.

The family tables (MTP keys included) against GPTModel.sharded_state_dict(); Megatron's MTP
logits of the converted checkpoint against a reference MTP forward built from
transformers' own modules loaded with the HF MTP weights (tests/mtp/reference.py), fp32 within
1e-4, the main logits unchanged; HF -> Megatron -> HF bit-exact with the MTP tensors converted
(GLM's copies of the embedding and output layer carried, tested in tests/glm4_moe_lite); the
MTP losses of both ``eaft.mtp`` modes; a two-step `finetune` of a Qwen3.5 with MTP; with
``eaft.fused_output`` the MTP head fused as well (the output layer never runs), against the
unfused path at TP1 and TP2 with sequence parallelism: the losses, statistics, Megatron's MTP
loss and acceptance counts, every gradient.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megatron_eaft.convert import verify
from megatron_eaft.convert.engine import (
    export_megatron_checkpoint,
    import_hf_checkpoint,
    plan_conversion,
)
from megatron_eaft.convert.torch_dist import sharded_object_key
from megatron_eaft.models.families import family_for_hf_config
from tests.glm4_moe_lite import glm4_moe_lite_models as glm
from tests.qwen3_5 import qwen3_5_models as q35
from tests.qwen3_5_moe import qwen3_5_moe_models as q35moe
from tests.train import helpers

ATOL = 1e-4
SEQ_LEN = 10
TRAIN_VOCAB = helpers.VOCAB


def _qwen(config, directory: Path, input_ids: torch.Tensor) -> SimpleNamespace:
    model = q35.random_model(config, seed=3)
    head = q35.mtp_head(config, seed=4)
    hf_dir = q35.save_with_mtp(model, head, directory / "hf")
    return _imported(hf_dir, model, head, input_ids)


def _glm(directory: Path, input_ids: torch.Tensor) -> SimpleNamespace:
    model = glm.random_model(glm.config(), seed=3)
    hf_dir = glm.save(model, directory / "hf", seed=4)
    return _imported(hf_dir, model, glm.mtp_head(model.config, seed=4), input_ids)


def _imported(hf_dir: Path, model, head, input_ids: torch.Tensor) -> SimpleNamespace:
    megatron_dir = hf_dir.parent / "megatron"
    import_hf_checkpoint(hf_dir, megatron_dir, progress=False, fsync=False)
    return SimpleNamespace(
        hf_dir=hf_dir,
        megatron_dir=megatron_dir,
        logits=q35.logits(model, input_ids),
        mtp_logits=head.logits(model, input_ids),
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    input_ids = verify.sample_inputs(q35.VOCAB, batch=2, seq_len=SEQ_LEN, seed=5)
    made = {
        # The trainer's test data has ids up to 511.
        "qwen3_5": _qwen(
            q35.text_config(mtp_num_hidden_layers=1, vocab_size=TRAIN_VOCAB),
            root / "qwen3_5",
            input_ids,
        ),
        "qwen3_5_moe": _qwen(
            q35moe.text_config(mtp_num_hidden_layers=1), root / "qwen3_5_moe", input_ids
        ),
        "glm4_moe_lite": _glm(root / "glm4_moe_lite", input_ids),
    }
    return input_ids, made


def megatron_mtp_logits(megatron_dir: str, input_ids: torch.Tensor, tp: int = 1):
    """Rank function: fp32 main and MTP-head logits, [batch, seq, vocab] each (gathered over
    ``tp`` tensor-parallel ranks)."""
    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.models import ParallelLayout, build_model, load_model_weights
    from megatron_eaft.models.bridge_config import read_model_metadata

    cpu_runtime.initialize_parallel(tp=tp)
    metadata = read_model_metadata(megatron_dir)
    layout = ParallelLayout(tensor=tp)
    model = build_model(metadata, layout, dtype=torch.float32, transformer_impl="local")
    load_model_weights(model, megatron_dir)
    main, mtp = main_and_mtp_logits(model, input_ids)
    vocab = metadata.vocab_size
    return main[..., :vocab], mtp[..., :vocab]


def main_and_mtp_logits(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In a rank: a GPTModel's fp32 main and first MTP head's logits in eval mode,
    [batch, seq, padded vocab] each, gathered over tensor-parallel ranks."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    captured = {}
    hook = model.mtp.register_forward_hook(lambda m, a, out: captured.setdefault("mtp", out))
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    try:
        with torch.no_grad():
            main = gather_from_tensor_model_parallel_region(model(input_ids, position_ids, None))
            # The block returns [main; MTP layer 1; ...] hidden states along the sequence axis.
            mtp_hidden = captured["mtp"].chunk(1 + model.config.mtp_num_layers, dim=0)[1]
            weight = (
                model.shared_embedding_or_output_weight()
                if model.share_embeddings_and_output_weights
                else None
            )
            mtp, _ = model.output_layer(mtp_hidden, weight=weight)
            mtp = gather_from_tensor_model_parallel_region(mtp)
    finally:
        hook.remove()
    return main.float(), mtp.transpose(0, 1).float()


def _all_mtp_logits(megatron_dirs: list[str], input_ids: torch.Tensor):
    """Per checkpoint: (main logits, MTP logits), and the keys GPTModel.sharded_state_dict()
    gives (tensors with global shapes, objects)."""
    from megatron_eaft.models import ModelMetadata
    from tests.convert.test_families import rank_sharded_layout

    return [
        (
            megatron_mtp_logits(d, input_ids),
            rank_sharded_layout(dict(ModelMetadata.read(d).hf_config), 1),
        )
        for d in megatron_dirs
    ]


def test_mtp_logits_match_the_reference_forward(dist, checkpoints):
    input_ids, made = checkpoints
    names = sorted(made)
    dirs = [str(made[n].megatron_dir) for n in names]
    results = dist.run(_all_mtp_logits, 1, dirs, input_ids)[0]
    for name, ((main, mtp), (tensors, objects)) in zip(names, results, strict=True):
        config = _json(made[name].hf_dir / "config.json")
        plan = plan_conversion(family_for_hf_config(config), config)
        assert plan.global_shapes() == tensors, name  # MTP keys included
        assert {sharded_object_key(*o) for o in plan.extra_state_objects()} == set(objects), name
        # The last position's next token is past the sequence: no label, not compared.
        reference = made[name].mtp_logits[:, :-1]
        comparison = verify.compare_logits(reference, mtp[:, :-1])
        assert comparison.max_abs_diff <= ATOL, (name, comparison.line())
        assert comparison.top1_agreement == 1.0, (name, comparison.line())
        main_comparison = verify.compare_logits(made[name].logits, main)
        assert main_comparison.max_abs_diff <= ATOL, (name, main_comparison.line())
        # The MTP head predicts something else than the main head.
        assert (reference - made[name].logits[:, :-1]).abs().max() > 100 * ATOL, name


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
def test_export_writes_the_mtp_tensors_back_bit_exact(checkpoints, tmp_path, name):
    made = checkpoints[1][name]
    export_megatron_checkpoint(made.megatron_dir, tmp_path / "out", progress=False, fsync=False)
    original, exported = _tensors(made.hf_dir), _tensors(tmp_path / "out")
    assert "mtp.fc.weight" in original
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    # Converted, not carried: the Megatron checkpoint has Megatron's MTP keys.
    config = made.hf_dir / "config.json"
    plan = plan_conversion(family_for_hf_config(_json(config)), _json(config))
    assert "mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight" in plan.global_shapes()
    assert not plan.layout.is_carried("mtp.fc.weight")


def _json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_a_checkpoint_without_its_mtp_tensors_converts_without_mtp(tmp_path, caplog):
    # transformers' save_pretrained drops mtp.*, the config keeps mtp_num_hidden_layers.
    config = q35.text_config(mtp_num_hidden_layers=1)
    hf_dir = q35.save(q35.random_model(config, seed=1), tmp_path / "hf")
    import_hf_checkpoint(hf_dir, tmp_path / "megatron", progress=False, fsync=False)
    assert "converting without MTP" in caplog.text
    from megatron_eaft.models import ModelMetadata

    metadata = ModelMetadata.read(tmp_path / "megatron")
    assert metadata.hf_variants == {"mtp": "absent"}
    kwargs = metadata.model_family.transformer_config_kwargs(
        metadata.hf_config, metadata.hf_variants
    )
    assert "mtp_num_layers" not in kwargs
    export_megatron_checkpoint(tmp_path / "megatron", tmp_path / "out", progress=False, fsync=False)
    assert sorted(_tensors(tmp_path / "out")) == sorted(_tensors(hf_dir))


def test_qwen3_5_refuses_more_than_one_mtp_layer():
    from megatron_eaft.models.family import UnsupportedConfigError

    config = q35.text_config(mtp_num_hidden_layers=2).to_dict()
    with pytest.raises(UnsupportedConfigError, match="mtp_num_hidden_layers"):
        family_for_hf_config(config)


# -- eaft.mtp: the MTP heads' loss ----------------------------------------------------------------


def mtp_loss_calls(megatron_dir: str, input_ids: torch.Tensor) -> dict:
    """Rank function: each compute_language_model_loss call of one forward under both modes,
    against Megatron's cross-entropy and the EAFT loss of the logits that call was given."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import eaft_loss_func, install_eaft_loss
    from megatron_eaft.models import ParallelLayout, build_model, load_model_weights
    from megatron_eaft.models.bridge_config import read_model_metadata
    from megatron_eaft.ops import EAFTConfig, vocab_parallel_weighted_cross_entropy

    cpu_runtime.initialize_parallel()
    metadata = read_model_metadata(megatron_dir)
    model = build_model(metadata, ParallelLayout(), dtype=torch.float32, transformer_impl="local")
    load_model_weights(model, megatron_dir)
    model.eval()
    labels = torch.roll(input_ids, -1, dims=1)
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    group = parallel_state.get_tensor_model_parallel_group()
    results = {}
    for mode in ("weighted", "plain"):
        config = EAFTConfig(kind="eaft", mtp=mode)
        install_eaft_loss(model, config)
        installed = model.compute_language_model_loss
        calls = []

        def recorder(call_labels, logits, installed=installed, calls=calls, config=config):
            given = logits.detach().clone()
            out = installed(call_labels, logits)
            ce = vocab_parallel_cross_entropy(
                given.clone(), call_labels.transpose(0, 1).contiguous()
            )
            eaft = vocab_parallel_weighted_cross_entropy(
                given.clone(), call_labels.transpose(0, 1).contiguous(), config, group
            )[0]
            calls.append(
                {
                    "main": call_labels is labels,
                    "loss": out.detach().clone(),
                    "to_ce": (out - ce.transpose(0, 1)).abs().max().item(),
                    "to_eaft": (out - eaft.transpose(0, 1)).abs().max().item(),
                }
            )
            return out

        model.compute_language_model_loss = recorder
        with torch.no_grad():
            loss = model(input_ids, position_ids, None, labels=labels)
        report = eaft_loss_func(torch.ones_like(labels), loss, config=config, check_for_nan=False)
        results[mode] = {"calls": calls, "report": {k: v.tolist() for k, v in report[2].items()}}
    return results


def test_mtp_modes_weight_the_mtp_heads_or_not_and_leave_the_main_head(dist, checkpoints):
    input_ids, made = checkpoints
    results = dist.run(mtp_loss_calls, 1, str(made["qwen3_5"].megatron_dir), input_ids)[0]
    tokens = input_ids.numel()
    mains = {}
    for mode, result in results.items():
        calls = result["calls"]
        # process_mtp_loss calls the seam once per MTP layer, then the main head.
        assert [c["main"] for c in calls] == [False, True], mode
        mtp, main = calls
        assert main["to_eaft"] <= 1e-6 < 1e-3 < main["to_ce"], mode  # the main head: EAFT
        mains[mode] = main["loss"]
        if mode == "weighted":
            assert mtp["to_eaft"] <= 1e-6 < 1e-3 < mtp["to_ce"]
        else:
            assert mtp["to_ce"] == 0.0 and mtp["to_eaft"] > 1e-3
        expected = [float(tokens), float(tokens)] if mode == "weighted" else [0.0, float(tokens)]
        assert result["report"]["eaft/mtp_weighted"] == expected
    assert torch.equal(mains["weighted"], mains["plain"])


def mtp_loss_mask_given(megatron_dir: str, input_ids: torch.Tensor) -> dict:
    """Rank function: the loss mask Megatron's process_mtp_loss gets from EAFTForwardStep (the
    forward step of `finetune`), against the batch's."""
    from unittest import mock

    from megatron.core.models.gpt import gpt_model

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import EAFTForwardStep
    from megatron_eaft.models import ParallelLayout, build_model, load_model_weights
    from megatron_eaft.models.bridge_config import read_model_metadata
    from megatron_eaft.ops import EAFTConfig

    cpu_runtime.initialize_parallel()
    metadata = read_model_metadata(megatron_dir)
    model = build_model(metadata, ParallelLayout(), dtype=torch.float32, transformer_impl="local")
    load_model_weights(model, megatron_dir)
    loss_mask = torch.ones(input_ids.shape)
    loss_mask[:, : input_ids.shape[1] // 2] = 0  # a prompt: no loss on its positions
    batch = {
        "tokens": input_ids,
        "labels": torch.roll(input_ids, -1, dims=1),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids),
    }
    given = []
    original = gpt_model.process_mtp_loss

    def recording(*args, **kwargs):
        given.append(kwargs["loss_mask"])
        return original(*args, **kwargs)

    with mock.patch.object(gpt_model, "process_mtp_loss", recording), torch.no_grad():
        EAFTForwardStep(EAFTConfig(kind="eaft"))(iter([batch]), model)
    return {"given": given, "batch": loss_mask}


def test_the_forward_step_gives_the_mtp_heads_the_loss_mask(dist, checkpoints):
    """Without it Megatron's MTP loss counts every position (prompts and padding too)."""
    input_ids, made = checkpoints
    result = dist.run(mtp_loss_mask_given, 1, str(made["qwen3_5"].megatron_dir), input_ids)[0]
    assert len(result["given"]) == 1 and result["given"][0] is not None
    assert torch.equal(result["given"][0], result["batch"])


# -- a finetune run ------------------------------------------------------------------------------


def two_steps(checkpoint: Path, data: Path, *extra: str) -> list[dict]:
    from megatron_eaft.train.trainer import Trainer

    overrides = ("train.iterations=2", "data.global_batch_size=2", "eaft.mtp=plain", *extra)
    config = helpers.finetune_config(checkpoint, data, *overrides)
    trainer = Trainer(config)
    try:
        records = trainer.fit().records
        return [{"reports": r.reports, "grad_norm": r.grad_norm} for r in records]
    finally:
        trainer.close()


def test_finetune_trains_a_qwen3_5_with_its_mtp_layer(dist, checkpoints, tmp_path):
    # One sample per row: Gated DeltaNet refuses packed rows on CPU.
    data = helpers.write_sft_dataset(tmp_path / "data", packing="pad")
    records = dist.run(two_steps, 1, checkpoints[1]["qwen3_5"].megatron_dir, data)[0]
    assert len(records) == 2
    for record in records:
        reports = record["reports"]
        assert reports["eaft/mtp_weighted"][0] == 0.0  # eaft.mtp=plain
        lm_total, lm_count = reports["lm loss"]
        assert lm_count > 0 and 0 < lm_total / lm_count < 20
        # Megatron's MTP loss (plain: cross-entropy), a mean over the step's 2 micro-batches.
        mtp_total, mtp_count = reports["mtp_1 loss"]
        assert mtp_count == 2 and 0 < mtp_total / mtp_count < 20
        assert 0 < record["grad_norm"] < float("inf")


def test_glm_copies_of_embedding_and_head_are_written_from_the_converted_tensors(
    checkpoints, tmp_path
):
    from megatron_eaft.models import ModelMetadata

    made = checkpoints[1]["glm4_moe_lite"]
    copies = ("model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight")
    assert ModelMetadata.read(made.megatron_dir).hf_copies == copies
    carried = made.megatron_dir / "hf" / "carried_tensors"
    assert not carried.exists() or not set(copies) & set(_tensors(carried))
    export_megatron_checkpoint(made.megatron_dir, tmp_path / "out", progress=False, fsync=False)
    exported = _tensors(tmp_path / "out")
    assert torch.equal(exported[copies[0]], exported["model.embed_tokens.weight"])
    assert torch.equal(exported[copies[1]], exported["lm_head.weight"])


def test_a_glm_copy_that_differs_is_carried_as_it_is(tmp_path, caplog):
    from tests.mtp.reference import add_tensors

    model = glm.random_model(glm.config(), seed=1)
    hf_dir = glm.save(model, tmp_path / "hf", seed=2)
    changed = "model.layers.3.shared_head.head.weight"
    add_tensors(hf_dir, {changed: model.lm_head.weight.detach() + 1.0})
    import_hf_checkpoint(hf_dir, tmp_path / "megatron", progress=False, fsync=False)
    assert f"{changed} differs from lm_head.weight" in caplog.text
    export_megatron_checkpoint(tmp_path / "megatron", tmp_path / "out", progress=False, fsync=False)
    original, exported = _tensors(hf_dir), _tensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], t) for k, t in original.items())


@pytest.mark.slow  # two 2-step finetune runs (~20-25 s)
def test_fused_output_with_an_mtp_layer_gives_the_unfused_steps(dist, checkpoints, tmp_path):
    # Both heads fused (chunks of 24 tokens do not divide the 64-token rows): the same losses,
    # MTP loss and gradient norms as unfused.
    data = helpers.write_sft_dataset(tmp_path / "data", packing="pad")
    checkpoint = checkpoints[1]["qwen3_5"].megatron_dir
    fused_overrides = ("eaft.fused_output=true", "eaft.fused_chunk_tokens=24", "eaft.mtp=weighted")
    unfused = dist.run(two_steps, 1, checkpoint, data, "eaft.mtp=weighted")[0]
    fused = dist.run(two_steps, 1, checkpoint, data, *fused_overrides)[0]
    assert all("mtp_1 loss" in step["reports"] for step in fused)
    helpers.assert_same_steps(fused, unfused)


def _mtp_logits_at_tp2(megatron_dirs: list[str], input_ids: torch.Tensor):
    from megatron_eaft.megatron import cpu_runtime

    results = []
    for directory in megatron_dirs:
        results.append(megatron_mtp_logits(directory, input_ids, tp=2))
        cpu_runtime.destroy_parallel()
    return results


def test_mtp_logits_at_tp2_match_the_reference_forward(dist, checkpoints):
    # Eval mode: MoE layers at TP2 need sequence parallelism only to train.
    input_ids, made = checkpoints
    names = sorted(made)
    dirs = [str(made[n].megatron_dir) for n in names]
    results = dist.run(_mtp_logits_at_tp2, 2, dirs, input_ids)[0]
    for name, (main, mtp) in zip(names, results, strict=True):
        comparison = verify.compare_logits(made[name].mtp_logits[:, :-1], mtp[:, :-1])
        assert comparison.max_abs_diff <= ATOL, (name, comparison.line())
        assert verify.compare_logits(made[name].logits, main).max_abs_diff <= ATOL, name


@pytest.mark.slow  # two 2-step finetune runs (~20-25 s)
def test_an_mtp_model_at_pp2_gives_the_pp1_steps(dist, checkpoints, tmp_path):
    # Megatron puts the MTP layer on the last pipeline stage, next to the output layer.
    data = helpers.write_sft_dataset(tmp_path / "data", packing="pad")
    checkpoint = checkpoints[1]["qwen3_5"].megatron_dir
    pp1 = dist.run(two_steps, 1, checkpoint, data)[0]
    pp2 = dist.run(two_steps, 2, checkpoint, data, "parallel.pipeline=2")[-1]
    assert all("mtp_1 loss" in step["reports"] for step in pp2)
    helpers.assert_same_steps(pp2, pp1)


# -- eaft.fused_output with MTP heads --------------------------------------------------------------

FUSED_CHUNK_TOKENS = 7  # does not divide the 20 tokens of a micro-batch
# Megatron's MTPLossLoggingHelper.tracker: per head, the loss logged as `mtp_1 loss` and the
# acceptance counts.
MTP_TRACKER_KEYS = ("loss_values", "correct_values", "total_values")


def fused_and_unfused_mtp(megatron_dir: str, input_ids: torch.Tensor, tp: int) -> dict:
    """Rank function: one training-mode forward and backward per eaft.mtp mode, unfused and
    fused (TP > 1: with sequence parallelism): the main loss and statistics, Megatron's MTP
    tracker (each head's loss, acceptance counts), every gradient; and, fused, whether the
    output layer ran and the largest logits block the fused op formed."""
    from unittest import mock

    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import install_eaft_loss
    from megatron_eaft.models import ParallelLayout, build_model, load_model_weights
    from megatron_eaft.models.bridge_config import read_model_metadata
    from megatron_eaft.ops import EAFTConfig
    from megatron_eaft.ops.fused_output import _FusedOutputWeightedCrossEntropy as Fused

    cpu_runtime.initialize_parallel(tp=tp)
    metadata = read_model_metadata(megatron_dir)
    layout = ParallelLayout(tensor=tp, sequence_parallel=tp > 1)
    model = build_model(metadata, layout, dtype=torch.float32, transformer_impl="local")
    load_model_weights(model, megatron_dir)
    labels = _labels_the_mtp_head_sometimes_predicts(model, input_ids)
    model.train()
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    loss_mask[0, :3] = 0  # a prompt: the MTP heads see it rolled
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    output_layer_calls = []
    logits_sizes = []

    def output_layer_forward(layer, *args, **kwargs):
        if layer is model.output_layer:
            output_layer_calls.append(tuple(args[0].shape))
        return original_forward(layer, *args, **kwargs)

    def chunk_logits(hidden, weight, out):
        logits = original_chunk_logits(hidden, weight, out)
        logits_sizes.append(logits.numel())
        return logits

    original_forward, original_chunk_logits = ColumnParallelLinear.forward, Fused.chunk_logits
    results = {}
    for mode in ("weighted", "plain"):
        for fused in (False, True):
            config = EAFTConfig(
                kind="eaft",
                topk=8,
                mtp=mode,
                fused_output=fused,
                fused_chunk_tokens=FUSED_CHUNK_TOKENS,
            )
            handle = install_eaft_loss(model, config)
            MTPLossLoggingHelper.clean_metrics_in_tracker()
            model.zero_grad(set_to_none=True)
            output_layer_calls.clear()
            logits_sizes.clear()
            with (
                mock.patch.object(ColumnParallelLinear, "forward", output_layer_forward),
                mock.patch.object(Fused, "chunk_logits", staticmethod(chunk_logits)),
            ):
                loss = model(input_ids, position_ids, None, labels=labels, loss_mask=loss_mask)
                (loss * loss_mask).sum().backward()
            handle.remove()
            tracker = MTPLossLoggingHelper.tracker
            stats = loss.eaft_stats
            results[(mode, fused)] = {
                "loss": loss.detach(),
                "stats": stats._replace(loss=stats.loss.detach()),
                "mtp": {k: tracker[k].clone() for k in MTP_TRACKER_KEYS},
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                "output_layer_calls": list(output_layer_calls),
                "largest_logits": max(logits_sizes, default=0),
            }
    results["partition_vocab"] = model.output_layer.weight.size(0)
    return results


def _labels_the_mtp_head_sometimes_predicts(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels where, at every other position, the MTP head's top-1 is right (a
    random model's never is), so that the acceptance counts are neither all nor none."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    captured = []
    hook = model.output_layer.register_forward_hook(lambda m, a, out: captured.append(out[0]))
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with torch.no_grad():
        model(input_ids, position_ids, None)  # without labels: the MTP head first, then the main
    hook.remove()
    predicted = gather_from_tensor_model_parallel_region(captured[0]).argmax(-1).t()  # [b, s]
    labels = torch.roll(input_ids, -1, dims=1)
    # The MTP head at position i predicts labels[:, i + 1].
    labels[:, 1::2] = predicted[:, 0:-1:2]
    return labels


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_output_fuses_the_mtp_heads_too(dist, checkpoints, tp):
    from tests.megatron.test_fused_seam import assert_grad_close, assert_same_stats

    input_ids, made = checkpoints
    directory = str(made["qwen3_5"].megatron_dir)
    for results in dist.run(fused_and_unfused_mtp, tp, directory, input_ids, tp):
        bound = FUSED_CHUNK_TOKENS * results.pop("partition_vocab")
        for mode in ("weighted", "plain"):
            unfused, fused = results[(mode, False)], results[(mode, True)]
            label = f"eaft.mtp={mode} TP={tp}"
            # Unfused, the output layer ran for the MTP head and the main head; fused, never,
            # and no logits block the fused op formed outgrew one chunk's C x V/TP.
            assert len(unfused["output_layer_calls"]) == 2, label
            assert fused["output_layer_calls"] == [], label
            assert 0 < fused["largest_logits"] <= bound, label
            torch.testing.assert_close(fused["loss"], unfused["loss"], rtol=1e-5, atol=1e-5)
            assert_same_stats(fused["stats"], unfused["stats"], label)
            # Megatron's tracker: `mtp_1 loss` and the acceptance counts.
            correct, total = unfused["mtp"]["correct_values"], unfused["mtp"]["total_values"]
            assert 0 < correct.item() < total.item(), label
            torch.testing.assert_close(
                fused["mtp"]["loss_values"], unfused["mtp"]["loss_values"], rtol=1e-5, atol=1e-5
            )
            for key in ("correct_values", "total_values"):
                assert torch.equal(fused["mtp"][key], unfused["mtp"][key]), (key, label)
            assert fused["grads"].keys() == unfused["grads"].keys()
            for name, grad in unfused["grads"].items():
                assert_grad_close(fused["grads"][name], grad, f"{name} {label}")
        # The modes differ on the MTP head only.
        weighted, plain = results[("weighted", False)], results[("plain", False)]
        assert torch.equal(weighted["loss"], plain["loss"])
        assert not torch.allclose(weighted["mtp"]["loss_values"], plain["mtp"]["loss_values"])


def test_deferred_logits_refuse_what_they_cannot_answer():
    from megatron_eaft.megatron.loss import DeferredLogits

    logits = DeferredLogits(torch.zeros(3, 2, 4), torch.zeros(5, 4), torch.nn.Linear(4, 5), None)
    assert logits.size(-1) == 5 and logits.shape == (3, 2, 5)
    with pytest.raises(TypeError, match="max before compute_language_model_loss"):
        logits.max(dim=-1)
    with pytest.raises(TypeError, match="softmax, but the fused path computes no logits"):
        torch.softmax(logits, -1)
    with pytest.raises(AttributeError, match=r"for \.float, but"):
        logits.float()
