"""EAFT for Megatron-LM's ``pretrain()``: the ``--eaft-*`` flags and a forward step.

Megatron-LM is extended through two seams, and this module fills both:

* ``extra_args_provider`` -> :func:`add_eaft_args` adds an "EAFT" argument group whose
  defaults are :class:`EAFTConfig`'s; :func:`eaft_config_from_args` turns the parsed
  namespace into a validated :class:`EAFTConfig`.
* ``forward_step_func`` -> :func:`forward_step` takes the batch exactly the way
  ``pretrain_gpt.py`` does (TP rank 0 reads the iterator and broadcasts, packed SFT rows become
  THD ``PackedSeqParams``, context parallelism slices the sequence), runs the model with the
  EAFT loss installed, and returns Megatron's ``(loss_sum, num_tokens, report)`` loss function
  with the EAFT report keys.

``pretrain()``'s calling convention changed in Megatron-Core 0.18 (a config container first,
flags parsed beforehand by ``parse_and_validate_args``); :func:`launch_pretrain` hides that.
The batch path needs Megatron-Core >= 0.18 (``get_batch_on_this_tp_rank`` taking a batch dict).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megatron_eaft.megatron import cpu_runtime
from megatron_eaft.megatron.loss import (
    eaft_loss_func,
    install_eaft_loss,
    installed_config,
    packed_causal_mask,
    unwrap_model,
    uses_local_attention,
)
from megatron_eaft.ops.config import (
    ENTROPY_MODES,
    FUSED_GRADIENTS,
    KINDS,
    MTP_MODES,
    NORMS,
    EAFTConfig,
)

# Keys of the batch dict pretrain_gpt.py's get_batch hands around (alphabetical, as Megatron's).
BATCH_KEYS = (
    "attention_mask",
    "cu_seqlens",
    "cu_seqlens_padded",
    "hybrid_cp_group",
    "labels",
    "local_cp_size",
    "loss_mask",
    "max_seqlen",
    "position_ids",
    "tokens",
)

# pretrain_gpt.py treats a loss 10x the largest seen so far as a spike.
SPIKY_LOSS_FACTOR = 10


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


_int_at_least_2 = _int_at_least(2)


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


_BOOLEAN = argparse.BooleanOptionalAction

# flag, EAFTConfig field, argparse options. One table, so parsing, mapping and errors agree.
EAFT_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "--eaft-kind",
        "kind",
        {
            "choices": KINDS,
            "help": "Token weighting: sft (plain CE), dft (w = p(y)), eaft (w = normalised "
            "top-K entropy ** alpha), sigmoid, masked.",
        },
    ),
    ("--eaft-topk", "topk", {"type": _int_at_least_2, "help": "K of the top-K entropy."}),
    ("--eaft-alpha", "alpha", {"type": _non_negative, "help": "Exponent on the entropy."}),
    (
        "--eaft-entropy",
        "entropy",
        {
            "choices": ENTROPY_MODES,
            "help": "topk: entropy of the K largest logits (the paper's); exact: full vocabulary.",
        },
    ),
    (
        "--eaft-norm",
        "norm",
        {
            "choices": NORMS,
            "help": "Entropy normaliser: lnk (ln K), paper (3.0, the authors' code), lnv "
            "(ln V, exact entropy only).",
        },
    ),
    ("--eaft-sigmoid-scale", "sigmoid_scale", {"type": _positive, "help": "Sigmoid slope."}),
    ("--eaft-sigmoid-center", "sigmoid_center", {"type": _unit_interval, "help": "Its centre."}),
    (
        "--eaft-masked-entropy-threshold",
        "masked_entropy_threshold",
        {"type": _unit_interval, "help": "masked kind: drop tokens with entropy below this ..."},
    ),
    (
        "--eaft-masked-prob-threshold",
        "masked_prob_threshold",
        {"type": _unit_interval, "help": "... and target probability below this."},
    ),
    (
        "--eaft-conflict-entropy-threshold",
        "conflict_entropy_threshold",
        {"type": _unit_interval, "help": "Confident conflict: entropy below this ..."},
    ),
    (
        "--eaft-conflict-prob-threshold",
        "conflict_prob_threshold",
        {"type": _unit_interval, "help": "... and target probability below this."},
    ),
    (
        "--eaft-diagnostics",
        "diagnostics",
        {"action": _BOOLEAN, "help": "Report entropy and conflicts for every kind."},
    ),
    (
        "--eaft-check-finite",
        "check_finite",
        {
            "action": _BOOLEAN,
            "help": "Raise on NaN/+inf logits or rows without a finite logit (one sync per "
            "micro-batch; -inf alone is a legal masked-out logit).",
        },
    ),
    (
        "--eaft-fused-output",
        "fused_output",
        {
            "action": _BOOLEAN,
            "help": "Output layer and loss in one, a chunk of tokens at a time: the logits of "
            "the micro-batch are never materialised.",
        },
    ),
    (
        "--eaft-fused-chunk-tokens",
        "fused_chunk_tokens",
        {
            "type": _int_at_least(0),
            "help": "Tokens per chunk of --eaft-fused-output (0: from the memory budget).",
        },
    ),
    (
        "--eaft-fused-chunk-memory-mib",
        "fused_chunk_memory_mib",
        {"type": _int_at_least(1), "help": "Memory budget of one fused chunk's logits (MiB)."},
    ),
    (
        "--eaft-fused-gradient",
        "fused_gradient",
        {
            "choices": FUSED_GRADIENTS,
            "help": "How --eaft-fused-output forms its gradients: recompute (the logits again "
            "in backward) or forward (in the forward pass: one output-layer GEMM fewer, an fp32 "
            "weight-sized buffer until backward).",
        },
    ),
    (
        "--eaft-mtp",
        "mtp",
        {
            "choices": MTP_MODES,
            "help": "Loss of the multi-token-prediction heads: weighted (like the main head, "
            "from each head's own logits) or plain (cross-entropy).",
        },
    ),
)
FLAG_FIELDS: dict[str, str] = {flag: field for flag, field, _ in EAFT_FLAGS}


def add_eaft_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``extra_args_provider`` for Megatron-LM: the EAFT flags, defaults from EAFTConfig."""
    default = EAFTConfig()
    group = parser.add_argument_group(
        title="EAFT",
        description="Entropy-Adaptive Fine-Tuning: per-token weights on the LM cross-entropy.",
    )
    for flag, field, options in EAFT_FLAGS:
        group.add_argument(flag, dest=_dest(flag), default=getattr(default, field), **options)
    return parser


def eaft_config_from_args(args: argparse.Namespace) -> EAFTConfig:
    """The validated EAFTConfig for parsed Megatron-LM args; errors name the flag."""
    values: dict[str, Any] = {}
    for flag, field in FLAG_FIELDS.items():
        dest = _dest(flag)
        if not hasattr(args, dest):
            raise ValueError(
                f"args has no {dest!r}: was the parser built with "
                "extra_args_provider=megatron_eaft.megatron.megatron_lm.add_eaft_args?"
            )
        values[field] = getattr(args, dest)
    try:
        return EAFTConfig(**values)
    except ValueError as error:
        message = str(error)
        for flag, field in FLAG_FIELDS.items():
            message = message.replace(f"EAFTConfig.{field}=", f"{flag}=")
        raise ValueError(message) from error


_CONFIG_CACHE: dict[int, tuple[argparse.Namespace, EAFTConfig]] = {}


def _config_for(args: argparse.Namespace) -> EAFTConfig:
    cached = _CONFIG_CACHE.get(id(args))
    if cached is None or cached[0] is not args:
        cached = (args, eaft_config_from_args(args))
        _CONFIG_CACHE.clear()
        _CONFIG_CACHE[id(args)] = cached
    return cached[1]


def _call_with_supported(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a Megatron helper with the keyword arguments its installed version accepts."""
    accepted = inspect.signature(function).parameters
    return function(*args, **{k: v for k, v in kwargs.items() if k in accepted})


def _empty_batch() -> dict[str, Any]:
    return dict.fromkeys(BATCH_KEYS)


def get_batch(
    data_iterator: Iterator[dict[str, torch.Tensor]] | None,
    model_config: Any,
    vp_stage: int | None = None,
) -> dict[str, Any]:
    """This rank's part of the next micro-batch, the way pretrain_gpt.py gets it.

    TP rank 0 reads the iterator and broadcasts to its TP group; SFT (packed) rows carry
    ``cu_seqlens``/``max_seqlen`` through to every stage; the sequence is split over CP ranks.
    Returns a dict keyed by :data:`BATCH_KEYS` (None where this stage needs nothing).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    get_batch_on_this_tp_rank, get_batch_on_this_cp_rank, flatten = _batch_helpers()
    args = get_args()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    has_cu_seqlens = bool(args.sft or getattr(args, "dataloader_inter_document_masking", False))
    is_hybrid_cp = bool(getattr(args, "hybrid_context_parallel", False))
    mtp_here = mtp_on_this_rank(
        layout=getattr(model_config, "pipeline_model_parallel_layout", None),
        mtp_num_layers=getattr(model_config, "mtp_num_layers", None),
        ignore_virtual=False,
        vp_stage=vp_stage,
    )
    edge_stage = is_first_or_last_pipeline_stage(vp_stage)
    if not edge_stage and not mtp_here and not has_cu_seqlens:
        return _empty_batch()

    batch: dict[str, Any] = {}
    if tp_rank == 0:
        if data_iterator is None:
            raise ValueError("TP rank 0 of a first/last pipeline stage got no data iterator")
        batch = dict(next(data_iterator))
        for key in BATCH_KEYS:
            value = batch.get(key)
            batch[key] = value.cuda(non_blocking=True) if torch.is_tensor(value) else None

    batch = _call_with_supported(
        get_batch_on_this_tp_rank,
        batch,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        has_cu_seqlens=has_cu_seqlens,
        is_sft=has_cu_seqlens,  # the 0.18 name of has_cu_seqlens
        is_hybrid_cp=is_hybrid_cp,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=mtp_here,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    if flatten is not None:
        batch = flatten(batch)
    if not edge_stage and not mtp_here:
        # Middle stages only need the THD boundaries for their attention.
        keep = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")
        return {key: (batch.get(key) if key in keep else None) for key in BATCH_KEYS}
    batch = _call_with_supported(
        get_batch_on_this_cp_rank,
        batch,
        is_hybrid_cp=is_hybrid_cp,
        cp_group=mpu.get_context_parallel_group(),
        hybrid_cp_group_func=getattr(mpu, "get_hybrid_data_context_parallel_groups", None),
        use_per_sequence_balancing=bool(
            getattr(args, "dataloader_inter_document_masking", False) and not args.sft
        ),
    )
    return {key: batch.get(key) for key in BATCH_KEYS}


def _batch_helpers():
    import megatron.core.utils as core_utils

    tp_helper = getattr(core_utils, "get_batch_on_this_tp_rank", None)
    cp_helper = getattr(core_utils, "get_batch_on_this_cp_rank", None)
    if tp_helper is None or "batch" not in inspect.signature(tp_helper).parameters:
        from megatron.core import __version__

        raise RuntimeError(
            f"megatron_eaft's Megatron-LM forward step needs Megatron-Core >= 0.18 (found "
            f"{__version__}): older versions read the iterator inside get_batch_on_this_tp_rank"
        )
    return tp_helper, cp_helper, getattr(core_utils, "flatten_batch_for_packed_sequences", None)


def packed_seq_params_from_batch(batch: dict[str, Any], seq_length: int):
    """THD PackedSeqParams for a packed row (None without ``cu_seqlens``), as pretrain_gpt.py."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is None:
        return None
    cu_seqlens = cu_seqlens.reshape(-1)
    cu_seqlens_padded = batch.get("cu_seqlens_padded")
    if cu_seqlens_padded is not None:
        cu_seqlens_padded = cu_seqlens_padded.reshape(-1)
    boundaries = cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens
    max_seqlen = int(batch["max_seqlen"].max().item())
    local_cp_size = batch.get("local_cp_size")
    values = {
        "qkv_format": "thd",
        "cu_seqlens_q": boundaries,
        "cu_seqlens_kv": boundaries,
        "cu_seqlens_q_padded": cu_seqlens_padded,
        "cu_seqlens_kv_padded": cu_seqlens_padded,
        "max_seqlen_q": max_seqlen,
        "max_seqlen_kv": max_seqlen,
        "local_cp_size": None if local_cp_size is None else int(local_cp_size.item()),
        "cp_group": batch.get("hybrid_cp_group"),
        "tokens_per_sample": seq_length,
    }
    known = {field.name for field in dataclasses.fields(PackedSeqParams)}
    return PackedSeqParams(**{k: v for k, v in values.items() if k in known})


def _record_seqlen_stats(cu_seqlens: torch.Tensor) -> None:
    """Megatron-LM >= 0.19 counts attention FLOPs of packed rows from the real boundaries."""
    from megatron.training import training

    record = getattr(training, "update_seqlen_stats_from_cu_seqlens", None)
    if record is not None:
        record(cu_seqlens.reshape(-1))


def megatron_lm_loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    *,
    config: EAFTConfig,
    training: bool,
    check_for_nan: bool,
    check_for_spiky_loss: bool,
    spiky_loss_factor: float = SPIKY_LOSS_FACTOR,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`eaft_loss_func` plus Megatron-LM's spiky-loss check on the optimised loss."""
    loss_sum, num_tokens, report = eaft_loss_func(
        loss_mask, output_tensor, config=config, training=training, check_for_nan=check_for_nan
    )
    if check_for_spiky_loss:
        validate_spiky_loss(loss_sum, spiky_loss_factor)
    return loss_sum, num_tokens, report


def validate_spiky_loss(loss_sum: torch.Tensor, factor: float) -> None:
    """Megatron's non-fatal "loss is much larger than seen so far" check (rerun machine)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    machine.validate_result(
        result=loss_sum,
        rejection_func=partial(machine.is_unexpectedly_large, threshold=factor, context="loss"),
        message="Spiky loss",
        tolerance=0.0,
        fatal=False,
    )


def forward_step(
    data_iterator: Iterator[dict[str, torch.Tensor]] | None,
    model: torch.nn.Module,
    return_schedule_plan: bool = False,
):
    """Megatron-LM ``forward_step_func`` with the EAFT loss (config from ``get_args()``)."""
    from megatron.core.utils import get_attr_wrapped_model, get_model_config
    from megatron.training import get_args, get_timers

    args = get_args()
    timers = get_timers()
    config = _config_for(args)
    if installed_config(model) != config:
        install_eaft_loss(model, config)

    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    batch = get_batch(data_iterator, get_model_config(model), vp_stage)
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    attention_mask, packed_seq_params = batch["attention_mask"], None
    if batch["cu_seqlens"] is not None:
        _record_seqlen_stats(batch["cu_seqlens"])
        if uses_local_attention(model):
            # Megatron's local attention takes no THD params; a block-diagonal mask is the
            # same computation (the layer spec a CPU run or a TE-less install uses).
            length = (tokens if tokens is not None else labels).size(1)
            attention_mask = packed_causal_mask(batch["cu_seqlens"].reshape(-1), length)
        else:
            packed_seq_params = packed_seq_params_from_batch(batch, args.seq_length)
    timers("batch-generator").stop()

    loss_func = partial(
        megatron_lm_loss_func,
        loss_mask,
        config=config,
        training=unwrap_model(model).training,
        check_for_nan=args.check_for_nan_in_loss_and_grad,
        check_for_spiky_loss=getattr(args, "check_for_spiky_loss", False),
    )
    if return_schedule_plan:
        if not getattr(args, "overlap_moe_expert_parallel_comm", False):
            raise ValueError(
                "return_schedule_plan needs --overlap-moe-expert-parallel-comm (Megatron-LM "
                "builds the 1F1B schedule plan only for EP communication overlap)"
            )
        plan = model.build_schedule_plan(
            tokens, batch["position_ids"], attention_mask, labels=labels, loss_mask=loss_mask
        )
        return plan, loss_func
    output_tensor = model(
        tokens,
        batch["position_ids"],
        attention_mask,
        labels=labels,
        loss_mask=loss_mask,
        packed_seq_params=packed_seq_params,
    )
    return output_tensor, loss_func


def parse_megatron_args(
    extra_args_provider: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
    | None = add_eaft_args,
    args_defaults: dict[str, Any] | None = None,
) -> argparse.Namespace:
    """Megatron-LM's own parse + validate + set globals (>= 0.18), with the EAFT flags added.

    The EAFT flags are checked here too, so a bad combination fails before any GPU work.
    """
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(
        extra_args_provider=extra_args_provider, args_defaults=args_defaults or {}
    )
    eaft_config_from_args(args)
    return args


def use_prebuilt_dataset_helpers() -> None:
    """Let ``pretrain()`` use the dataset index helpers the megatron-core wheel ships.

    ``pretrain()`` runs ``make`` in ``megatron/core/datasets`` on rank 0 to build
    ``helpers_cpp`` and exits when make fails. The wheel ships ``helpers_cpp`` already built
    but no Makefile, so make always fails there (GPU or not). Only in that case, with the
    built module importable, is the build skipped; a source checkout still builds as usual.
    """
    from megatron.core.datasets import utils as dataset_utils

    if (Path(dataset_utils.__file__).parent / "Makefile").exists():
        return
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        return
    dataset_utils.compile_helpers = _helpers_already_built


def _helpers_already_built() -> None:
    pass


def launch_pretrain(
    train_valid_test_datasets_provider: Callable[..., Any],
    model_provider: Callable[..., Any] | None = None,
    *,
    forward_step_func: Callable[..., Any] = forward_step,
    args_defaults: dict[str, Any] | None = None,
    **pretrain_kwargs: Any,
) -> None:
    """Run Megatron-LM's ``pretrain()`` with the EAFT flags and forward step, any core version.

    Megatron-Core 0.17 parses the flags inside ``pretrain`` (``extra_args_provider``); 0.18+
    takes a config container built from already-parsed args. On 0.19+ the model can come from
    the container's GPTModelConfig (``model_provider=None``); 0.18 needs a provider.
    """
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    # CPU runs (tests, CI) with --distributed-backend gloo; inert with CUDA. Applied before any
    # flag is validated, because validation already asks the GPU for its architecture.
    cpu_runtime.apply_megatron_training_cpu_patches()
    use_prebuilt_dataset_helpers()
    parameters = inspect.signature(pretrain).parameters
    common = {
        "train_valid_test_dataset_provider": train_valid_test_datasets_provider,
        "model_type": ModelType.encoder_or_decoder,
        "forward_step_func": forward_step_func,
        **pretrain_kwargs,
    }
    if "cfg_container" not in parameters:
        pretrain(
            model_provider=model_provider,
            extra_args_provider=add_eaft_args,
            args_defaults=args_defaults or {},
            **common,
        )
        return

    from megatron.training import argument_utils

    args = parse_megatron_args(args_defaults=args_defaults)
    container_parameters = inspect.signature(
        argument_utils.pretrain_cfg_container_from_args
    ).parameters
    if "model_cfg" in container_parameters and model_provider is None:
        container = argument_utils.pretrain_cfg_container_from_args(
            args, argument_utils.gpt_config_from_args(args)
        )
    else:
        if model_provider is None:
            raise ValueError(
                "this Megatron-Core builds models only through a model_provider: pass "
                "Megatron-LM's partial(model_provider, gpt_builder)"
            )
        container = argument_utils.pretrain_cfg_container_from_args(args)
    pretrain(container, model_provider=model_provider, **common)
