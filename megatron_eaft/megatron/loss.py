"""EAFT inside a Megatron-Core GPTModel, and the forward step / loss function around it.

The seam is ``LanguageModule.compute_language_model_loss(labels, logits)``: every loss the
model computes on its last pipeline stage (the main loss and multi-token-prediction losses,
with or without ``cross_entropy_loss_fusion``) goes through it, under any TP/PP/DP/CP layout.
:func:`install_eaft_loss` shadows it on one model instance; the handle's ``remove()`` puts
Megatron's own method back. The per-token statistics ride on the returned loss tensor
(``loss.eaft_stats``), which is the very object Megatron's schedules hand to the loss function.

:class:`EAFTForwardStep` is a forward step with Megatron's signature
``(data_iterator, model) -> (output_tensor, loss_func)``; it installs the loss on first use,
so it drops into Megatron-LM's ``pretrain()`` and Megatron-Bridge's ``finetune()`` as is.

With ``fused_output`` the main head skips the logits: the seam also shadows
``GPTModel._postprocess`` on the instance so that, whenever labels are given outside inference,
it passes Megatron's ``output_processor`` hook (0.19: called with the decoder's hidden states,
the output layer and the tied weight, in place of ``output_layer`` + ``compute_language_model_
loss``). Both the plain forward and the combined-1F1B schedule plan go through ``_postprocess``.
The processor gathers the hidden states over TP as ColumnParallelLinear does and calls
:func:`megatron_eaft.ops.fused_output_weighted_cross_entropy`. Multi-token-prediction heads run
before it inside ``process_mtp_loss`` and keep the unfused seam (Megatron derives their
acceptance counts from their logits).

Multi-token prediction (MTP): ``process_mtp_loss`` (inside ``_postprocess``, before the main
head) calls the same ``compute_language_model_loss`` once per MTP layer, with labels it rolled
from a clone of the forward's labels. The seam tells them apart by identity: during
``_postprocess`` (shadowed on the instance for models with MTP layers) the main call is the one
given the forward's own ``labels`` object, every other call is an MTP head. ``eaft.mtp`` says
what the MTP heads get: ``weighted`` (the configured weighting from each head's own logits) or
``plain`` (Megatron's cross-entropy). The main loss tensor then carries the mode, reported as
``eaft/mtp_weighted`` (1 or 0). Megatron logs each head's loss itself (``mtp_1 loss``, ...:
the weighted loss in ``weighted`` mode, the cross-entropy in ``plain``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from megatron_eaft.ops import (
    EAFTConfig,
    TokenLoss,
    fused_output_weighted_cross_entropy,
    vocab_parallel_weighted_cross_entropy,
)
from megatron_eaft.ops.vocab_parallel import normalised_entropy
from megatron_eaft.ops.weighting import confident_conflicts

REPORT_KEYS = (
    "lm loss",
    "eaft loss",
    "eaft/mean_weight",
    "eaft/mean_entropy",
    "eaft/confident_conflict_frac",
    "eaft/mtp_weighted",
)
# Set on the model during ``_postprocess``: the forward's labels, those of the main head.
_MAIN_LABELS = "_eaft_main_labels"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel under DDP / Float16Module / FSDP wrappers (they all expose ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _tp_group(model: torch.nn.Module):
    group = getattr(model, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group


@dataclasses.dataclass
class EAFTLossHandle:
    """Undoes :func:`install_eaft_loss`."""

    model: torch.nn.Module
    config: EAFTConfig

    def remove(self) -> None:
        if self.model.__dict__.get("_eaft_handle") is not self:
            return
        self.model.__dict__.pop("compute_language_model_loss", None)
        self.model.__dict__.pop("_postprocess", None)
        self.model.__dict__.pop(_MAIN_LABELS, None)
        del self.model._eaft_handle


def install_eaft_loss(model: torch.nn.Module, config: EAFTConfig) -> EAFTLossHandle:
    """Make ``model`` (a GPTModel, wrapped or not) compute the token-weighted loss.

    Installing again replaces the previous configuration. With ``kind="sft"`` the loss is
    Megatron's own cross-entropy, bit for bit (untouched when diagnostics are off).
    """
    core = unwrap_model(model)
    if not hasattr(core, "compute_language_model_loss"):
        raise TypeError(
            f"{type(core).__name__} has no compute_language_model_loss: EAFT needs a "
            "Megatron-Core LanguageModule such as GPTModel"
        )
    previous = core.__dict__.get("_eaft_handle")
    if previous is not None:
        previous.remove()
    handle = EAFTLossHandle(core, config)
    mtp_layers = getattr(getattr(core, "config", None), "mtp_num_layers", None) or 0
    if config.fused_output or mtp_layers:
        _install_postprocess(core, config, mtp_layers)
    core._eaft_handle = handle
    if config.kind == "sft" and not config.diagnostics:
        return handle

    tp_group = _tp_group(core)
    megatron_loss = core.compute_language_model_loss  # the class's method, bound

    def plain_mtp_call(labels: torch.Tensor) -> bool:
        # Outside _postprocess (no marker) every call is the main head's.
        if config.mtp != "plain" or _MAIN_LABELS not in core.__dict__:
            return False
        return labels is not core.__dict__[_MAIN_LABELS]

    def sft_with_diagnostics(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if plain_mtp_call(labels):
            return megatron_loss(labels, logits)
        # Megatron's own loss, bit for bit (fused or not); entropy is read first because
        # Megatron's cross-entropy overwrites fp32 logits in place.
        with torch.no_grad():
            entropy = normalised_entropy(logits, config, tp_group).transpose(0, 1).contiguous()
        loss = megatron_loss(labels, logits)
        ce = loss.detach()
        ones = torch.ones_like(ce)
        loss.eaft_stats = TokenLoss(loss, ce, ones, entropy, torch.exp(-ce))
        return loss

    def compute_language_model_loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if plain_mtp_call(labels):
            return megatron_loss(labels, logits)
        # Megatron's layout: labels [b, s], logits [s, b, V/TP]; the loss comes back [b, s].
        out = vocab_parallel_weighted_cross_entropy(
            logits, labels.transpose(0, 1).contiguous(), config, tp_group
        )
        per_token = TokenLoss(*(t.transpose(0, 1).contiguous() for t in out))
        loss = per_token.loss
        loss.eaft_stats = per_token
        return loss

    core.compute_language_model_loss = (
        sft_with_diagnostics if config.kind == "sft" else compute_language_model_loss
    )
    return handle


def _install_postprocess(core: torch.nn.Module, config: EAFTConfig, mtp_layers: int) -> None:
    """Shadow ``_postprocess``: it marks the main head's labels (models with MTP layers) and,
    with ``fused_output``, hands the main head to the fused processor."""
    postprocess = getattr(core, "_postprocess", None)
    signature = None if postprocess is None else inspect.signature(postprocess)
    needed = ("labels", "output_processor") if config.fused_output else ("labels",)
    if signature is None or not all(p in signature.parameters for p in needed):
        what = "eaft fused_output" if config.fused_output else "eaft with MTP layers"
        raise TypeError(
            f"{what} needs a Megatron-Core GPTModel whose _postprocess takes "
            f"{' and '.join(needed)} (Megatron-Core >= 0.19); {type(core).__name__} has none"
        )
    processor = None
    if config.fused_output:
        model_config = getattr(core, "config", None)
        if getattr(model_config, "use_mup", False):
            raise ValueError("eaft fused_output does not apply MuP's output scaling: turn one off")
        if getattr(core, "post_process", False):
            _check_fused_output_layer(core.output_layer, model_config)
        processor = partial(fused_output_processor, eaft_config=config, tp_group=_tp_group(core))

    def _postprocess(*args: Any, **kwargs: Any) -> Any:
        from megatron.core.inference.utils import InferenceMode

        bound = signature.bind(*args, **kwargs)
        arguments = bound.arguments
        labels = arguments.get("labels")
        if (
            processor is not None
            and arguments.get("output_processor") is None
            and labels is not None
            and not InferenceMode.is_active()
        ):
            arguments["output_processor"] = processor
        core.__dict__[_MAIN_LABELS] = labels
        try:
            output = postprocess(*bound.args, **bound.kwargs)
        finally:
            core.__dict__.pop(_MAIN_LABELS, None)
        if mtp_layers and labels is not None and torch.is_tensor(output):
            output.eaft_mtp = config.mtp  # the main loss: its report names the MTP mode
        return output

    core._postprocess = _postprocess


def _check_fused_output_layer(output_layer: torch.nn.Module, model_config: Any) -> None:
    from megatron.core.tensor_parallel import ColumnParallelLinear

    problems = []
    if not isinstance(output_layer, ColumnParallelLinear):
        problems.append(f"the output layer is a {type(output_layer).__name__}")
    if getattr(model_config, "defer_embedding_wgrad_compute", False):
        problems.append("defer_embedding_wgrad_compute is on")
    if getattr(output_layer, "gtp_remat_size", 1) > 1:
        problems.append("the output weight is rematerialised (generalized TP)")
    if getattr(output_layer, "bias", None) is not None:
        problems.append("the output layer has a bias")
    if problems:
        raise ValueError(
            "eaft fused_output replaces a plain ColumnParallelLinear output layer, but "
            + "; ".join(problems)
        )


def output_layer_input(hidden_states: torch.Tensor, output_layer: torch.nn.Module, tp_group):
    """The hidden states as ColumnParallelLinear feeds them to its GEMM: all-gathered over
    sequence parallelism (reduce-scatter in backward), else all-reduced in backward."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if getattr(output_layer, "sequence_parallel", False):
        return gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=True, group=tp_group
        )
    if getattr(output_layer, "disable_grad_reduce", False):
        return hidden_states
    return copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)


def megatron_wgrad_placeholder(weight: torch.Tensor) -> torch.Tensor | None:
    """What Megatron's linear returns for a weight whose gradient went into main_grad: with
    DDP (grad_added_to_main_grad exists) a dummy, zeros for a weight shared with the
    embedding (zero_out_wgrad: DDP then adds .grad, the embedding's part, to main_grad)."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    placeholder = make(weight.main_grad.shape, dtype=weight.dtype, device=weight.device)
    weight.grad_added_to_main_grad = True
    return placeholder


def _weight_grad_sink(
    weight: torch.Tensor, output_layer: torch.nn.Module
) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor | None]]:
    if (
        getattr(output_layer, "gradient_accumulation_fusion", False)
        and weight.requires_grad
        and getattr(weight, "main_grad", None) is not None
    ):
        return weight.main_grad, megatron_wgrad_placeholder
    return None, lambda _: None


def fused_output_processor(
    *,
    hidden_states: torch.Tensor,
    output_layer: torch.nn.Module,
    output_weight: torch.Tensor | None,
    labels: torch.Tensor,
    eaft_config: EAFTConfig,
    tp_group,
    **unused: Any,
) -> torch.Tensor:
    """GPTModel's ``output_processor``: the per-token loss [b, s] of the main head, as
    ``compute_language_model_loss`` returns it, with ``eaft_stats`` on it."""
    weight = output_layer.weight if output_weight is None else output_weight
    hidden = output_layer_input(hidden_states, output_layer, tp_group)
    main_grad, placeholder = _weight_grad_sink(weight, output_layer)
    out = fused_output_weighted_cross_entropy(
        hidden,
        weight,
        labels.transpose(0, 1).contiguous(),
        eaft_config,
        tp_group,
        chunk_tokens=eaft_config.fused_chunk_tokens or None,
        chunk_memory_bytes=eaft_config.fused_chunk_memory_mib << 20,
        main_grad=main_grad,
        main_grad_placeholder=placeholder,
    )
    per_token = TokenLoss(*(t.transpose(0, 1).contiguous() for t in out))
    loss = per_token.loss
    if eaft_config.kind != "sft" or eaft_config.diagnostics:
        # Without diagnostics, kind sft reports what Megatron's own loss does (no statistics).
        loss.eaft_stats = per_token
    return loss


def installed_config(model: torch.nn.Module) -> EAFTConfig | None:
    handle = unwrap_model(model).__dict__.get("_eaft_handle")
    return None if handle is None else handle.config


def _pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack([total.detach().float(), count.float()])


def eaft_loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    *,
    config: EAFTConfig,
    training: bool = True,
    check_for_nan: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's ``(loss_sum, num_tokens, report)`` contract for the per-token EAFT loss.

    The optimised loss is ``sum(w * CE)`` over loss-masked tokens (plain CE in evaluation);
    the schedule divides it by the token count. Report values are ``[sum, count]``.
    """
    mask = loss_mask.reshape(-1).float()
    num_tokens = mask.sum().to(torch.int)
    stats: TokenLoss | None = getattr(output_tensor, "eaft_stats", None)
    if stats is None:  # Megatron's own CE (kind sft without diagnostics)
        ce_sum = (output_tensor.float().reshape(-1) * mask).sum()
        report = {"lm loss": _pair(ce_sum, num_tokens), "eaft loss": _pair(ce_sum, num_tokens)}
        loss_sum = ce_sum
    else:
        ce = stats.ce.reshape(-1)
        ce_sum = (ce * mask).sum()
        weighted_sum = (output_tensor.float().reshape(-1) * mask).sum()
        loss_sum = weighted_sum if training else ce_sum
        report = {
            "lm loss": _pair(ce_sum, num_tokens),
            "eaft loss": _pair(weighted_sum, num_tokens),
            "eaft/mean_weight": _pair((stats.weight.reshape(-1) * mask).sum(), num_tokens),
        }
        entropy = stats.entropy.reshape(-1)
        # Decided by the configuration, not by reading the entropy: no host sync here.
        if config.needs_entropy:
            conflicts = confident_conflicts(config, entropy, stats.target_prob.reshape(-1))
            report["eaft/mean_entropy"] = _pair((entropy * mask).sum(), num_tokens)
            report["eaft/confident_conflict_frac"] = _pair(
                (conflicts.float() * mask).sum(), num_tokens
            )
    mtp_mode = getattr(output_tensor, "eaft_mtp", None)
    if mtp_mode is not None:
        weighted = float(mtp_mode == "weighted")
        report["eaft/mtp_weighted"] = _pair(num_tokens.float() * weighted, num_tokens)
    if check_for_nan:
        _validate_loss(loss_sum)
    return loss_sum, num_tokens, report


def _validate_loss(loss_sum: torch.Tensor) -> None:
    """Megatron's NaN / Inf checks, through its rerun state machine (fault attribution)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    machine.validate_result(
        result=loss_sum,
        rejection_func=torch.isnan,
        message="found NaN in local forward loss calculation",
        tolerance=0.0,
        fatal=True,
    )
    machine.validate_result(
        result=loss_sum,
        rejection_func=torch.isinf,
        message="found Inf in local forward loss calculation",
        tolerance=0.0,
        fatal=True,
    )


def uses_local_attention(model: torch.nn.Module) -> bool:
    """Megatron's local DotProductAttention cannot take packed (THD) sequences."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return any(isinstance(m, DotProductAttention) for m in unwrap_model(model).modules())


def packed_causal_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Block-diagonal causal mask [1, 1, s, s] (True = masked) for documents packed in a row."""
    positions = torch.arange(seq_length, device=cu_seqlens.device)
    document = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    same_document = document.unsqueeze(0) == document.unsqueeze(1)
    causal = positions.unsqueeze(0) <= positions.unsqueeze(1)
    return ~(same_document & causal).unsqueeze(0).unsqueeze(0)


def packed_seq_params(cu_seqlens: torch.Tensor):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = cu_seqlens.to(torch.int32)
    max_length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_length,
        max_seqlen_kv=max_length,
    )


def _to_device(batch: dict[str, Any]) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
    """GPTModel.forward keyword arguments for a batch (tokens, labels, position_ids, and for
    packed rows cu_seqlens: THD params where the attention supports them, else a mask)."""
    tokens = batch["tokens"]
    inputs: dict[str, Any] = {
        "input_ids": tokens,
        "position_ids": batch["position_ids"],
        "attention_mask": batch.get("attention_mask"),
        "labels": batch["labels"],
    }
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is not None:
        if tokens.size(0) != 1:
            raise ValueError(
                f"packed sequences need micro-batch size 1 (one packed row), got {tokens.size(0)}"
            )
        cu_seqlens = cu_seqlens.reshape(-1)
        if uses_local_attention(model):
            inputs["attention_mask"] = packed_causal_mask(cu_seqlens, tokens.size(1))
        else:
            inputs["packed_seq_params"] = packed_seq_params(cu_seqlens)
    return inputs


class EAFTForwardStep:
    """``forward_step(data_iterator, model) -> (output_tensor, loss_func)`` with EAFT.

    The iterator yields dicts with ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
    ([b, s]) and optionally ``attention_mask`` or ``cu_seqlens`` (packed rows). The loss is
    installed on the model at the first call (idempotent), so this object can be handed to
    Megatron-LM's ``pretrain`` or Megatron-Bridge's ``finetune`` directly.
    """

    def __init__(self, config: EAFTConfig, check_for_nan: bool = True):
        self.config = config
        self.check_for_nan = check_for_nan

    def __call__(self, data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
        if installed_config(model) != self.config:
            install_eaft_loss(model, self.config)
        batch = _to_device(next(data_iterator))
        output = model(**model_inputs(batch, model))
        loss_func = partial(
            eaft_loss_func,
            batch["loss_mask"],
            config=self.config,
            training=unwrap_model(model).training,
            check_for_nan=self.check_for_nan,
        )
        return output, loss_func
