"""The Megatron-LM adapter: --eaft-* flags -> EAFTConfig, and a pretrain() forward step that
takes batches the way pretrain_gpt.py does and gives exactly EAFTForwardStep's loss."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from unittest import mock

import pytest
import torch

from megatron_eaft.megatron.megatron_lm import FLAG_FIELDS, add_eaft_args, eaft_config_from_args
from megatron_eaft.ops import EAFTConfig
from tests.megatron import tiny_gpt


def _parse(argv: list[str]) -> argparse.Namespace:
    return add_eaft_args(argparse.ArgumentParser(prog="pretrain_gpt.py")).parse_args(argv)


def test_defaults_are_eaft_config_defaults():
    assert eaft_config_from_args(_parse([])) == EAFTConfig()


def test_every_flag_maps_to_its_field():
    args = _parse(
        [
            "--eaft-kind=sigmoid",
            "--eaft-topk=16",
            "--eaft-alpha=2",
            "--eaft-entropy=exact",
            "--eaft-norm=lnv",
            "--eaft-sigmoid-scale=12.5",
            "--eaft-sigmoid-center=0.3",
            "--eaft-masked-entropy-threshold=0.2",
            "--eaft-masked-prob-threshold=0.4",
            "--eaft-conflict-entropy-threshold=0.1",
            "--eaft-conflict-prob-threshold=0.05",
            "--no-eaft-diagnostics",
            "--eaft-check-finite",
        ]
    )
    expected = EAFTConfig(
        kind="sigmoid",
        topk=16,
        alpha=2.0,
        entropy="exact",
        norm="lnv",
        sigmoid_scale=12.5,
        sigmoid_center=0.3,
        masked_entropy_threshold=0.2,
        masked_prob_threshold=0.4,
        conflict_entropy_threshold=0.1,
        conflict_prob_threshold=0.05,
        diagnostics=False,
        check_finite=True,
    )
    assert eaft_config_from_args(args) == expected
    assert set(FLAG_FIELDS.values()) == set(EAFTConfig.__dataclass_fields__) - {"ignore_index"}


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--eaft-kind", "focal"], "invalid choice: 'focal'"),
        (["--eaft-entropy", "approx"], "invalid choice: 'approx'"),
        (["--eaft-norm", "ln2"], "invalid choice: 'ln2'"),
        (["--eaft-topk", "1"], "--eaft-topk: must be an integer >= 2"),
        (["--eaft-alpha", "-1"], "--eaft-alpha: must be a finite number >= 0"),
        (["--eaft-conflict-prob-threshold", "1.5"], "must be in [0, 1]"),
        (["--eaft-sigmoid-scale", "0"], "must be a finite number > 0"),
    ],
)
def test_invalid_values_are_argparse_errors(capsys, argv, complaint):
    with pytest.raises(SystemExit) as stopped:
        _parse(argv)
    assert stopped.value.code == 2
    assert complaint in capsys.readouterr().err


def test_inconsistent_flags_name_the_flag():
    with pytest.raises(ValueError, match=r"--eaft-norm='lnv' is invalid"):
        eaft_config_from_args(_parse(["--eaft-norm", "lnv"]))  # ln V needs exact entropy


def test_args_without_the_group_say_how_to_add_it():
    with pytest.raises(ValueError, match="extra_args_provider"):
        eaft_config_from_args(argparse.Namespace(lr=1e-4))


# ---- inside Megatron-LM's own argument parsing and global state ------------------------------

TINY_ARGV = [
    *[
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--group-query-attention",
    ],
    *[
        "--num-query-groups",
        "2",
        "--kv-channels",
        "16",
        "--ffn-hidden-size",
        "128",
        "--normalization",
        "RMSNorm",
    ],
    *["--swiglu", "--disable-bias-linear", "--qk-layernorm", "--position-embedding-type", "rope"],
    *["--rotary-base", "1000000", "--untie-embeddings-and-output-weights", "--vocab-size", "256"],
    *f"--seq-length {tiny_gpt.SEQ} --max-position-embeddings {tiny_gpt.SEQ}".split(),
    *[
        "--tokenizer-type",
        "NullTokenizer",
        "--train-iters",
        "1",
        "--lr",
        "1e-4",
        "--transformer-impl",
        "local",
    ],
    *["--mock-data", "--no-create-attention-mask-in-dataloader", "--no-rope-fusion"],
]


@contextlib.contextmanager
def megatron_lm_globals(argv: list[str]) -> Iterator[argparse.Namespace]:
    """Megatron-LM's args parsed from ``argv`` (our flags added), validated and set as its
    global args/timers, as pretrain_gpt.py's parse_and_validate_args does; undone afterwards."""
    from megatron.training import arguments, global_vars

    world_size = torch.distributed.get_world_size()
    with (
        mock.patch.object(sys, "argv", ["pretrain_gpt.py", *argv]),
        # validate_args asks the GPU's architecture and CUDA's connection setting when TP > 1.
        mock.patch.object(arguments, "get_device_arch_version", return_value=9),
        mock.patch.dict(os.environ, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}),
    ):
        args = arguments.parse_args(extra_args_provider=add_eaft_args)
        args.rank, args.world_size = torch.distributed.get_rank(), world_size
        arguments.validate_args(args, {})
    global_vars.set_global_variables(args, build_tokenizer=False)
    try:
        yield args
    finally:
        global_vars.unset_global_variables()


def _packed_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One packed SFT row in Megatron's SFTDataset layout (micro-batch 1)."""
    lengths = [12, 9, 11]
    cu_seqlens = torch.tensor([0, 12, 21, 32], dtype=torch.int32)
    return {
        "tokens": batch["tokens"][:1],
        "labels": batch["labels"][:1],
        "loss_mask": batch["loss_mask"][:1],
        "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        "cu_seqlens": cu_seqlens.unsqueeze(0),
        "max_seqlen": torch.tensor([max(lengths)], dtype=torch.int32),
    }


def _forward_steps_agree(extra_argv: list[str], packed: bool, training: bool) -> dict:
    from megatron.core import parallel_state

    from megatron_eaft.megatron import cpu_runtime, megatron_lm
    from megatron_eaft.megatron.loss import EAFTForwardStep

    cpu_runtime.initialize_parallel(tp=torch.distributed.get_world_size())
    micro_batch = 1 if packed else tiny_gpt.MICRO_BATCH
    argv = [*TINY_ARGV, "--micro-batch-size", str(micro_batch)]
    argv += ["--tensor-model-parallel-size", str(torch.distributed.get_world_size())]
    with megatron_lm_globals([*argv, *extra_argv]) as args:
        config = megatron_lm.eaft_config_from_args(args)
        model = tiny_gpt.tiny_model(tiny_gpt.tiny_config())
        tiny_gpt.load_layout_independent_weights(model)
        model.train(training)
        data = tiny_gpt.batch(5)
        if packed:
            data = _packed_rows(data)
        # Only TP rank 0 reads the data: the others must receive it by broadcast.
        iterator = iter([data]) if parallel_state.get_tensor_model_parallel_rank() == 0 else None
        with torch.no_grad():
            output, loss_func = megatron_lm.forward_step(iterator, model)
            ours = loss_func(output)
            reference_batch = {k: v for k, v in data.items() if k != "max_seqlen"}
            if packed:
                reference_batch["cu_seqlens"] = data["cu_seqlens"].reshape(-1)
            output, loss_func = EAFTForwardStep(config)(iter([reference_batch]), model)
            reference = loss_func(output)
    return {"config": config, "ours": ours, "reference": reference}


@pytest.mark.parametrize(
    ("extra_argv", "packed", "training"),
    [
        (["--eaft-topk", "8"], False, True),
        (["--eaft-kind", "sigmoid", "--eaft-topk", "8", "--sft"], True, True),
        (["--eaft-topk", "8"], False, False),
    ],
    ids=["eaft", "sigmoid-packed-sft", "eval"],
)
def test_forward_step_at_tp2_equals_eaft_forward_step(dist, extra_argv, packed, training):
    for result in dist.run(_forward_steps_agree, 2, extra_argv, packed, training):
        assert result["config"] == eaft_config_from_args(_parse(extra_argv[:4]))
        loss_sum, num_tokens, report = result["ours"]
        expected_sum, expected_tokens, expected_report = result["reference"]
        torch.testing.assert_close(loss_sum, expected_sum, rtol=0, atol=0)
        assert int(num_tokens) == int(expected_tokens) > 0
        assert report.keys() == expected_report.keys()
        assert "eaft/confident_conflict_frac" in report
        for key, value in report.items():
            torch.testing.assert_close(value, expected_report[key], rtol=0, atol=0)
        optimised = "eaft loss" if training else "lm loss"
        torch.testing.assert_close(loss_sum, report[optimised][0])


def _launch_with_pretrain_recorded(argv: list[str]) -> dict:
    """launch_pretrain against Megatron-LM's real pretrain() signature (autospec), so the
    flags go through parse_and_validate_args and the config container is really built."""
    from megatron import training
    from megatron.core.enums import ModelType
    from megatron.training import global_vars

    from megatron_eaft.megatron import cpu_runtime, megatron_lm

    cpu_runtime.initialize_parallel()
    recorded = mock.create_autospec(training.pretrain)

    def datasets_provider(num_samples, vp_stage=None):
        raise AssertionError("pretrain is recorded, not run")

    try:
        with (
            mock.patch.object(sys, "argv", ["pretrain_gpt.py", *argv]),
            mock.patch.object(training, "pretrain", recorded),
        ):
            megatron_lm.launch_pretrain(datasets_provider)
        call = recorded.call_args
        container = call.args[0]
        args = global_vars.get_args()
        return {
            "eaft": megatron_lm.eaft_config_from_args(args),
            "num_layers": container.model.transformer.num_layers,
            "check_for_nan": container.rerun_state_machine.check_for_nan_in_loss,
            "forward_step": call.kwargs["forward_step_func"] is megatron_lm.forward_step,
            "model_type": call.kwargs["model_type"] == ModelType.encoder_or_decoder,
            "provider": call.kwargs["train_valid_test_dataset_provider"] is datasets_provider,
        }
    finally:
        global_vars.unset_global_variables()


def test_launch_pretrain_parses_eaft_flags_and_builds_the_config_container(dist):
    argv = [*TINY_ARGV, "--micro-batch-size", "2", "--eaft-kind", "dft", "--eaft-check-finite"]
    result = dist.run(_launch_with_pretrain_recorded, 1, argv)[0]
    assert result["eaft"] == EAFTConfig(kind="dft", check_finite=True)
    assert result["num_layers"] == 2
    assert result["check_for_nan"] is True
    assert result["forward_step"] and result["model_type"] and result["provider"]


def _bad_flag_stops_the_launch(argv: list[str]) -> str:
    from megatron import training
    from megatron.training import global_vars

    from megatron_eaft.megatron import cpu_runtime, megatron_lm

    cpu_runtime.initialize_parallel()
    recorded = mock.create_autospec(training.pretrain)
    try:
        with (
            mock.patch.object(sys, "argv", ["pretrain_gpt.py", *argv]),
            mock.patch.object(training, "pretrain", recorded),
        ):
            megatron_lm.launch_pretrain(lambda num_samples: None)
    except ValueError as error:
        return "" if recorded.called else str(error)
    finally:
        global_vars.unset_global_variables()
    return "launched"


def test_launch_pretrain_rejects_inconsistent_eaft_flags_before_pretrain(dist):
    argv = [*TINY_ARGV, "--micro-batch-size", "2", "--eaft-norm", "lnv"]
    assert "--eaft-norm='lnv' is invalid" in dist.run(_bad_flag_stops_the_launch, 1, argv)[0]


def _example_dataset_config(argv: list[str]) -> dict:
    """The example's GPTDatasetConfig for Megatron-LM args parsed from ``argv``."""
    import importlib.util
    from pathlib import Path

    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel(tp=torch.distributed.get_world_size())
    path = Path(__file__).resolve().parents[2] / "examples/megatron_lm/pretrain_gpt_eaft.py"
    spec = importlib.util.spec_from_file_location("pretrain_gpt_eaft", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with megatron_lm_globals(argv) as args:
        config = example.dataset_config_from_args(args)
        return {
            "context_parallel_size": config.context_parallel_size,
            "sequence_parallel_size": config.sequence_parallel_size,
            "data_parallel_size": config.data_parallel_size,
            "sequence_length": config.sequence_length,
            "args_sequence_parallel": args.sequence_parallel,
        }


def test_example_dataset_config_carries_the_parallel_sizes_sft_packing_reads(dist):
    # SFTDataset pads packed rows by config.context_parallel_size; left unset (None) the
    # first --sft batch failed with "'>' not supported between NoneType and int".
    argv = [*TINY_ARGV, "--micro-batch-size", "1", "--tensor-model-parallel-size", "2", "--sft"]
    for result in dist.run(_example_dataset_config, 2, argv):
        assert result["context_parallel_size"] == 1
        assert result["data_parallel_size"] == 1
        assert result["sequence_parallel_size"] == (2 if result["args_sequence_parallel"] else 0)
        assert result["sequence_length"] == tiny_gpt.SEQ
