"""EAFT for Megatron-Bridge: a forward step for ``finetune(cfg, forward_step_func=...)``.

Bridge has no loss registry: the forward step is its extension point. It accepts four
forward-step signatures and inspects the callable to decide whether to inject its
``GlobalState`` (a parameter annotated ``GlobalState`` or named ``state``):

* :class:`EAFTBridgeForwardStep` is ``(state, data_iterator, model, return_schedule_plan=False)``,
  so it also serves as the 3-argument ``(state, data_iterator, model)`` form. It reads what
  Bridge's own ``gpt_step.forward_step`` reads from the state: the dataset's attention-mask and
  packing settings, the rerun machine's NaN / spiky-loss checks, timers, FLOPs accounting.
* :class:`StatelessEAFTBridgeForwardStep` is ``(data_iterator, model, return_schedule_plan=False)``,
  also the 2-argument form, for pipelines that bind their own state; it uses Bridge's defaults
  (NaN check on, spiky-loss check off).

Both take batches as Bridge's ``gpt_step`` does (``tokens, labels, loss_mask, position_ids``,
optional ``attention_mask``, packed THD metadata as ``cu_seqlens_q/kv[_padded]`` and
``max_seqlen_q/kv`` or the legacy ``cu_seqlens`` / ``cu_seqlens_argmin`` / ``max_seqlen``;
packed rows need micro-batch 1) and return Bridge's report conventions: ``"lm loss"`` stays the
unweighted CE (so curves compare with plain SFT), the EAFT keys are added, and evaluation
optimises plain CE, as Bridge's distillation loss does.

:func:`eaft_pre_wrap_hook` installs the loss on every model chunk before DDP wrapping
(``cfg.model.register_pre_wrap_hook``); :func:`enable_eaft` does that and returns the step.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from megatron_eaft.megatron.loss import (
    install_eaft_loss,
    installed_config,
    packed_causal_mask,
    unwrap_model,
    uses_local_attention,
)
from megatron_eaft.megatron.megatron_lm import megatron_lm_loss_func
from megatron_eaft.ops.config import EAFTConfig

if TYPE_CHECKING:
    from megatron.bridge.training.state import GlobalState

# Bridge's two spellings of packed (THD) metadata: device tensors and host-side values.
CURRENT_PACKED_DEVICE_KEYS = (
    "cu_seqlens_q",
    "cu_seqlens_kv",
    "cu_seqlens_q_padded",
    "cu_seqlens_kv_padded",
)
CURRENT_PACKED_HOST_KEYS = ("max_seqlen_q", "max_seqlen_kv")
LEGACY_PACKED_DEVICE_KEYS = ("cu_seqlens", "cu_seqlens_unpadded")
LEGACY_PACKED_HOST_KEYS = ("cu_seqlens_argmin", "max_seqlen", "cu_seqlens_unpadded_argmin")
# Never sliced along the sequence for context parallelism.
_NOT_SEQUENCE_KEYS = frozenset(
    (
        *CURRENT_PACKED_DEVICE_KEYS,
        *CURRENT_PACKED_HOST_KEYS,
        *LEGACY_PACKED_DEVICE_KEYS,
        *LEGACY_PACKED_HOST_KEYS,
        "token_count",
        "attention_mask",
    )
)
# Bridge's masked_next_token_loss default when the rerun machine has no factor of its own.
DEFAULT_SPIKY_LOSS_FACTOR = 10.0


def eaft_pre_wrap_hook(config: EAFTConfig) -> Callable[[list[Any]], list[Any]]:
    """A Bridge pre-wrap hook that installs the EAFT loss on each GPTModel chunk."""

    def install_on_chunks(model_chunks: list[Any]) -> list[Any]:
        for chunk in model_chunks:
            install_eaft_loss(chunk, config)
        return model_chunks

    install_on_chunks.eaft_config = config  # type: ignore[attr-defined]
    return install_on_chunks


def register_eaft_pre_wrap_hook(model_config: Any, config: EAFTConfig) -> None:
    """Register :func:`eaft_pre_wrap_hook` on a Bridge model provider or ModelConfig."""
    hook = eaft_pre_wrap_hook(config)
    if hasattr(model_config, "register_pre_wrap_hook"):
        model_config.register_pre_wrap_hook(hook)
    elif isinstance(getattr(model_config, "pre_wrap_hooks", None), list):
        model_config.pre_wrap_hooks.append(hook)
    else:
        raise TypeError(
            f"{type(model_config).__name__} takes no pre-wrap hooks: expected a Megatron-Bridge "
            "model provider (register_pre_wrap_hook) or ModelConfig (pre_wrap_hooks)"
        )


def enable_eaft(cfg: Any, config: EAFTConfig) -> EAFTBridgeForwardStep:
    """Switch a Bridge ``ConfigContainer`` to EAFT: hook on ``cfg.model``, forward step back.

    Usage: ``finetune(cfg, forward_step_func=enable_eaft(cfg, EAFTConfig()))``.
    """
    register_eaft_pre_wrap_hook(cfg.model, config)
    return EAFTBridgeForwardStep(config)


def glm4_layer_spec(config: Any, vp_stage: int | None = None) -> Any:
    """A Bridge ``transformer_layer_spec`` for dense GLM-4: megatron-eaft's sandwich-norm layer
    in the provider's ``transformer_impl``. A module-level function, so Bridge's saved run
    config names it and ``convert export`` recognises the model."""
    from megatron_eaft.models import get_family

    return get_family("glm4").layer_spec(config, config.transformer_impl)


def use_local_sft_data(cfg: Any, dataset_root: str) -> None:
    """Point a Bridge SFT recipe at local JSONL/packed data instead of its HF-hub dataset.

    Bridge's GPTSFTDatasetConfig takes exactly one source and refuses a ``dataset_root`` next
    to any Hugging Face split or materialisation setting (the recipes set a validation
    proportion), so all of those are cleared.
    """
    cfg.dataset.dataset_root = dataset_root
    for hf_setting in (
        "hf_dataset",
        "hf_validation_dataset",
        "hf_test_dataset",
        "hf_output_root",
        "hf_validation_proportion",
    ):
        if hasattr(cfg.dataset, hf_setting):
            setattr(cfg.dataset, hf_setting, None)
    if hasattr(cfg.dataset, "hf_rewrite"):
        cfg.dataset.hf_rewrite = False


def add_sft_run_args(parser: Any, default_tp: int) -> Any:
    """The arguments the Bridge SFT examples share: our checkpoint in, Bridge's out, the
    layout and run length, local data, and EAFT's own (``add_eaft_args``)."""
    from megatron_eaft.megatron.megatron_lm import add_eaft_args

    parser.add_argument("--megatron-checkpoint", required=True, help="`convert import` output")
    parser.add_argument("--save", required=True, help="where Bridge writes checkpoints")
    parser.add_argument("--tp", type=int, default=default_tp, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--seq-length", type=int, default=4096, help="row length")
    parser.add_argument("--train-iters", type=int, default=None, help="override the recipe's")
    parser.add_argument("--dataset-root", default=None, help="local SFT JSONL/packed directory")
    return add_eaft_args(parser)


def apply_sft_run_args(cfg: Any, args: Any) -> None:
    """Put :func:`add_sft_run_args`' checkpoint, row length, data and run length into a Bridge
    ``ConfigContainer`` (the model provider's layout is the caller's)."""
    cfg.checkpoint.pretrained_checkpoint = str(args.megatron_checkpoint)
    cfg.checkpoint.save = args.save
    cfg.dataset.seq_length = args.seq_length
    if args.dataset_root is not None:
        use_local_sft_data(cfg, args.dataset_root)
    if args.train_iters is not None:
        cfg.train.train_iters = args.train_iters


def finetune_with_eaft(cfg: Any, args: Any) -> None:
    """Bridge's ``finetune()`` of ``cfg`` with the EAFT forward step ``args`` ask for."""
    from megatron.bridge.training.finetune import finetune

    from megatron_eaft.megatron.megatron_lm import eaft_config_from_args

    finetune(cfg, forward_step_func=enable_eaft(cfg, eaft_config_from_args(args)))


class EAFTBridgeForwardStep:
    """Bridge forward step ``(state, data_iterator, model, return_schedule_plan=False)``."""

    def __init__(self, config: EAFTConfig):
        self.config = config

    def __call__(
        self,
        state: GlobalState,
        data_iterator: Iterator[dict[str, Any]] | None,
        model: torch.nn.Module,
        return_schedule_plan: bool = False,
    ):
        return bridge_forward_step(
            self.config, data_iterator, model, return_schedule_plan, state=state
        )

    def stateless(self) -> StatelessEAFTBridgeForwardStep:
        return StatelessEAFTBridgeForwardStep(self.config)


class StatelessEAFTBridgeForwardStep:
    """Bridge forward step ``(data_iterator, model, return_schedule_plan=False)``."""

    def __init__(self, config: EAFTConfig):
        self.config = config

    def __call__(
        self,
        data_iterator: Iterator[dict[str, Any]] | None,
        model: torch.nn.Module,
        return_schedule_plan: bool = False,
    ):
        return bridge_forward_step(self.config, data_iterator, model, return_schedule_plan)


def bridge_forward_step(
    config: EAFTConfig,
    data_iterator: Iterator[dict[str, Any]] | None,
    model: torch.nn.Module,
    return_schedule_plan: bool = False,
    *,
    state: GlobalState | None = None,
):
    """One micro-batch through ``model`` with the EAFT loss -> ``(output, loss_func)``."""
    from megatron.core.utils import get_model_config

    if installed_config(model) != config:
        install_eaft_loss(model, config)
    model_config = get_model_config(model)
    cfg = None if state is None else state.cfg
    vp_stage = _vp_stage(model)

    with _timed(state, "batch-generator"):
        batch = get_batch(data_iterator, model, cfg, vp_stage=vp_stage)
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    packed = packed_metadata(batch)
    if state is not None:
        _account_flops(state, tokens, batch, vp_stage, model_config)

    forward_args: dict[str, Any] = {
        "input_ids": tokens,
        "position_ids": batch["position_ids"],
        "attention_mask": batch.get("attention_mask"),
        "labels": labels,
        # Megatron's MTP heads take their loss mask from here (all ones without it; Bridge's
        # own gpt_step does not pass it), and the fused main head needs it for
        # fused_gradient: forward.
        "loss_mask": loss_mask,
    }
    if packed is not None:
        rows = next(t for t in (tokens, labels, loss_mask) if t is not None)
        if rows.size(0) != 1:
            raise ValueError(
                f"packed sequences need micro-batch size 1 (one packed row), got {rows.size(0)}"
            )
        params = _packed_seq_params(packed)
        if uses_local_attention(model):
            # Megatron's local attention takes no THD params; a block-diagonal causal mask
            # computes the same thing (the layer spec of a TE-less / CPU run).
            forward_args["attention_mask"] = packed_causal_mask(params.cu_seqlens_q, rows.size(1))
        else:
            forward_args["packed_seq_params"] = params

    loss_func = partial(
        megatron_lm_loss_func,
        loss_mask,
        config=config,
        training=unwrap_model(model).training,
        check_for_nan=_rerun_setting(cfg, "check_for_nan_in_loss", True),
        check_for_spiky_loss=_rerun_setting(cfg, "check_for_spiky_loss", False),
        spiky_loss_factor=_spiky_loss_factor(),
    )
    if return_schedule_plan:
        if not getattr(model_config, "overlap_moe_expert_parallel_comm", False):
            raise ValueError(
                "return_schedule_plan needs overlap_moe_expert_parallel_comm in the model config"
            )
        plan = model.build_schedule_plan(
            tokens,
            batch["position_ids"],
            forward_args["attention_mask"],
            labels=labels,
            loss_mask=loss_mask,
        )
        return plan, loss_func
    with _straggler_timed(state):
        output_tensor = model(**forward_args)
    return output_tensor, loss_func


def get_batch(
    data_iterator: Iterator[dict[str, Any]] | None,
    model: torch.nn.Module,
    cfg: Any = None,
    *,
    vp_stage: int | None = None,
) -> dict[str, Any]:
    """This stage's tensors of the next micro-batch, moved and CP-sliced like Bridge's gpt_step.

    First stages keep tokens/position_ids, last stages labels/loss_mask; middle stages read
    the iterator only when their attention needs the batch (a dataset attention mask or packed
    rows; without a Bridge config: whenever they were handed an iterator).
    """
    from megatron.core import parallel_state

    first = parallel_state.is_pipeline_first_stage(
        ignore_virtual=vp_stage is None, vp_stage=vp_stage
    )
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    mtp_inputs = _stage_needs_mtp_inputs(model, last)
    middle_needs_batch = (
        data_iterator is not None if cfg is None else _middle_stage_needs_batch(cfg)
    )
    middle = not first and not last
    if middle and not middle_needs_batch and not mtp_inputs:
        return {key: None for key in ("tokens", "labels", "loss_mask", "position_ids")}
    if data_iterator is None:
        raise ValueError("this pipeline stage needs the batch but was given no data iterator")

    skip_mask = getattr(
        getattr(cfg, "dataset", None), "skip_getting_attention_mask_from_dataset", True
    )
    raw = next(data_iterator)
    device_keys: set[str] = set()
    host_keys: set[str] = set()
    if middle and middle_needs_batch:
        device_keys.update(("tokens", "labels", "loss_mask", "attention_mask", "position_ids"))
    elif not skip_mask or cfg is None:
        device_keys.add("attention_mask")
    if first or mtp_inputs:
        device_keys.update(("tokens", "position_ids"))
    if last:
        device_keys.update(("labels", "loss_mask"))
    if "cu_seqlens_q" in raw:
        device_keys.update(CURRENT_PACKED_DEVICE_KEYS)
        host_keys.update(CURRENT_PACKED_HOST_KEYS)
    elif "cu_seqlens" in raw:
        device_keys.update(LEGACY_PACKED_DEVICE_KEYS)
        host_keys.update(LEGACY_PACKED_HOST_KEYS)

    batch: dict[str, Any] = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids", *raw):
        value = raw.get(key)
        if value is None or not torch.is_tensor(value):
            batch[key] = value if key in host_keys else None
        elif key in device_keys:
            batch[key] = value.cuda(non_blocking=True)
        elif key in host_keys:
            batch[key] = value.cpu()
        else:
            batch[key] = None
    return _slice_for_context_parallel(batch)


def _slice_for_context_parallel(batch: dict[str, Any]) -> dict[str, Any]:
    from megatron.core import parallel_state

    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    cp_group = parallel_state.get_context_parallel_group()
    metadata = packed_metadata(batch)
    if metadata is None:
        from megatron.core.utils import get_batch_on_this_cp_rank

        accepted = inspect.signature(get_batch_on_this_cp_rank).parameters
        kwargs = {"is_hybrid_cp": False, "cp_group": cp_group}
        return get_batch_on_this_cp_rank(
            batch, **{k: v for k, v in kwargs.items() if k in accepted}
        )

    from megatron.bridge.training.utils.packed_seq_utils import get_thd_cp_partition_indices

    boundaries = _packed_seq_params(metadata)
    cu_seqlens = boundaries.cu_seqlens_q_padded
    if cu_seqlens is None:
        cu_seqlens = boundaries.cu_seqlens_q
    indices: dict[tuple[int, torch.device], torch.Tensor] = {}
    for key, value in batch.items():
        if value is None or key in _NOT_SEQUENCE_KEYS or not torch.is_tensor(value):
            continue
        where = (value.size(1), value.device)
        if where not in indices:
            indices[where] = get_thd_cp_partition_indices(
                cu_seqlens, total_tokens=value.size(1), cp_group=cp_group, device=value.device
            )
        batch[key] = value.index_select(1, indices[where])
    return batch


def packed_metadata(batch: dict[str, Any]) -> dict[str, Any] | None:
    """The packed-sequence entries of a batch (None for unpacked rows)."""
    if batch.get("cu_seqlens_q") is not None:
        keys = (*CURRENT_PACKED_DEVICE_KEYS, *CURRENT_PACKED_HOST_KEYS)
    elif batch.get("cu_seqlens") is not None:
        keys = (*LEGACY_PACKED_DEVICE_KEYS, *LEGACY_PACKED_HOST_KEYS)
    else:
        return None
    return {key: batch[key] for key in keys if batch.get(key) is not None}


def _packed_seq_params(metadata: dict[str, Any]):
    # Bridge's own conversion: it trims the -1 padding of legacy offline-packed rows.
    from megatron.bridge.training.utils.packed_seq_utils import get_packed_seq_params

    return get_packed_seq_params(dict(metadata))


def _vp_stage(model: torch.nn.Module) -> int | None:
    stage = getattr(unwrap_model(model), "vp_stage", None)
    return stage if isinstance(stage, int) else None


def _stage_needs_mtp_inputs(model: torch.nn.Module, is_last: bool) -> bool:
    """Multi-token prediction embeds tokens again on the stage that holds its layers."""
    from megatron.core.utils import get_model_config

    model_config = get_model_config(model)
    if not getattr(model_config, "mtp_num_layers", None):
        return False
    if getattr(model_config, "pipeline_model_parallel_layout", None) is None:
        return is_last
    from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank

    return mtp_on_this_rank(
        layout=model_config.pipeline_model_parallel_layout,
        mtp_num_layers=model_config.mtp_num_layers,
        ignore_virtual=False,
        vp_stage=_vp_stage(model),
    )


def _middle_stage_needs_batch(cfg: Any) -> bool:
    dataset = getattr(cfg, "dataset", None)
    if not getattr(dataset, "skip_getting_attention_mask_from_dataset", True):
        return True
    if getattr(dataset, "enable_offline_packing", False):
        specs = getattr(dataset, "offline_packing_specs", None)
        size = getattr(specs, "packed_sequence_size", None)
        return size is None or size > 0
    return bool(getattr(dataset, "enable_in_batch_packing", False))


def _rerun_setting(cfg: Any, name: str, default: bool) -> bool:
    rerun = getattr(cfg, "rerun_state_machine", None)
    return bool(getattr(rerun, name, default))


def _spiky_loss_factor() -> float:
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    return float(getattr(machine, "spiky_loss_factor", DEFAULT_SPIKY_LOSS_FACTOR))


@contextlib.contextmanager
def _timed(state: GlobalState | None, name: str):
    if state is None:
        yield
        return
    timer = state.timers(name, log_level=2)
    timer.start()
    try:
        with state.straggler_timer(bdata=True):
            yield
    finally:
        timer.stop()


def _straggler_timed(state: GlobalState | None):
    return contextlib.nullcontext() if state is None else state.straggler_timer


def _account_flops(
    state: GlobalState,
    tokens: torch.Tensor | None,
    batch: dict[str, Any],
    vp_stage: int | None,
    model_config: Any,
) -> None:
    """Feed Bridge's throughput report (TFLOP/s) the way its gpt_step does, where it has one."""
    try:
        from megatron.bridge.training.utils.flop_utils import accumulate_flops_metadata
    except ImportError:
        return
    from megatron.core import parallel_state

    packed_flops: dict[str, Any] = {}
    if parallel_state.get_context_parallel_world_size() == 1:
        if batch.get("cu_seqlens_q") is not None:
            padded = batch.get("cu_seqlens_q_padded")
            packed_flops["cu_seqlens"] = padded if padded is not None else batch["cu_seqlens_q"]
            packed_flops["cu_seqlens_unpadded"] = (
                batch["cu_seqlens_q"] if padded is not None else None
            )
        elif batch.get("cu_seqlens") is not None:
            for key in (
                "cu_seqlens",
                "cu_seqlens_argmin",
                "cu_seqlens_unpadded",
                "cu_seqlens_unpadded_argmin",
            ):
                packed_flops[key] = batch.get(key)
    accepted = inspect.signature(accumulate_flops_metadata).parameters
    kwargs = {
        "vp_stage": vp_stage,
        "config_seq_len": getattr(model_config, "seq_length", None),
        **packed_flops,
    }
    accumulate_flops_metadata(state, tokens, **{k: v for k, v in kwargs.items() if k in accepted})
