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
:func:`megatron_eaft.ops.fused_output_weighted_cross_entropy`.

The MTP heads are fused with it, inside Megatron's own ``process_mtp_loss`` (label and loss-mask
rolling, ``mtp_loss_scaling_factor``, ``MTPLossAutoScaler``, ``calculate_per_token_loss``,
``mtp_detach_heads``, CP and the ``mtp_1 loss`` / acceptance logging all stay Megatron's):
while ``_postprocess`` runs with the fused processor, the main head never calls the output layer,
so its calls there are the MTP heads' (``process_mtp_loss``: ``output_layer`` then
``compute_language_model_loss`` per head, Megatron-Core 0.18-0.20). For that call the output
layer's forward, shadowed on the instance, returns a :class:`DeferredLogits` (the head's
hidden states and weight) and ``compute_language_model_loss`` runs the fused loss on it, gathering
over SP as ColumnParallelLinear would. The one other thing Megatron derives from MTP logits
(>= 0.19) is each head's acceptance counts, from the logits' top-1; the fused pass keeps each
token's shard-local top-1 (O(T)), which answers ``max(dim=-1)`` / ``torch.argmax`` as the
logits would. Any other use raises an error naming it (a Megatron that starts to read the MTP
logits otherwise needs ``fused_output`` off). Without labels, or in inference, nothing is
deferred: Megatron computes the MTP logits as usual.

Multi-token prediction (MTP): ``process_mtp_loss`` (inside ``_postprocess``, before the main
head) calls the same ``compute_language_model_loss`` once per MTP layer, with labels it rolled
from a clone of the forward's labels. The seam tells them apart by identity: during
``_postprocess`` (shadowed on the instance for models with MTP layers) the main call is the one
given the forward's own ``labels`` object, every other call is an MTP head. ``eaft.mtp`` says
what the MTP heads get: ``weighted`` (the configured weighting from each head's own logits) or
``plain`` (Megatron's cross-entropy; fused: the fused op's kind ``sft``). The main loss tensor
then carries the mode, reported as ``eaft/mtp_weighted`` (1 or 0). Megatron logs each head's
loss itself (``mtp_1 loss``, ...: the weighted loss in ``weighted`` mode, the cross-entropy in
``plain``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch

from megatron_eaft.ops import (
    EAFTConfig,
    TokenLoss,
    fused_output_weighted_cross_entropy,
    vocab_parallel_weighted_cross_entropy,
)
from megatron_eaft.ops.config import FusedGradient
from megatron_eaft.ops.fused_output import LocalTop1
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
    megatron_loss = core.compute_language_model_loss  # the class's method, bound
    seam = megatron_loss
    if config.kind != "sft" or config.diagnostics:
        seam = _token_weighted_seam(core, config, megatron_loss)
    if config.fused_output and mtp_layers:
        seam = _deferred_mtp_heads_seam(seam, _mtp_head_config(config))
    if seam is not megatron_loss:
        core.compute_language_model_loss = seam
    return handle


def _mtp_head_config(config: EAFTConfig) -> EAFTConfig:
    """What an MTP head's loss is: the configured weighting, or Megatron's cross-entropy."""
    if config.mtp == "weighted":
        return config
    return dataclasses.replace(config, kind="sft", diagnostics=False)


def _deferred_mtp_heads_seam(seam: Callable, head_config: EAFTConfig) -> Callable:
    """``compute_language_model_loss`` that runs an MTP head's fused loss when given that
    head's :class:`DeferredLogits` (fused_output), and ``seam`` on real logits."""

    def compute_language_model_loss(labels: torch.Tensor, logits: Any) -> torch.Tensor:
        if isinstance(logits, DeferredLogits):
            return logits.loss(labels, head_config)
        return seam(labels, logits)

    return compute_language_model_loss


def _token_weighted_seam(
    core: torch.nn.Module, config: EAFTConfig, megatron_loss: Callable
) -> Callable:
    """``compute_language_model_loss`` with the token weighting (or kind sft's statistics) on
    the logits it is given; MTP heads under ``eaft.mtp=plain`` keep ``megatron_loss``."""
    tp_group = _tp_group(core)

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

    return sft_with_diagnostics if config.kind == "sft" else compute_language_model_loss


def _install_postprocess(core: torch.nn.Module, config: EAFTConfig, mtp_layers: int) -> None:
    """Shadow ``_postprocess``: it marks the main head's labels (models with MTP layers) and,
    with ``fused_output``, hands the main head to the fused processor and defers the MTP
    heads' logits (:class:`DeferredLogits`)."""
    postprocess = getattr(core, "_postprocess", None)
    signature = None if postprocess is None else inspect.signature(postprocess)
    needed = ("labels", "output_processor") if config.fused_output else ("labels",)
    if signature is None or not all(p in signature.parameters for p in needed):
        what = "eaft fused_output" if config.fused_output else "eaft with MTP layers"
        raise TypeError(
            f"{what} needs a Megatron-Core GPTModel whose _postprocess takes "
            f"{' and '.join(needed)} (Megatron-Core >= 0.19); {type(core).__name__} has none"
        )
    processor = tp_group = None
    if config.fused_output:
        model_config = getattr(core, "config", None)
        if getattr(model_config, "use_mup", False):
            raise ValueError("eaft fused_output does not apply MuP's output scaling: turn one off")
        if getattr(core, "post_process", False):
            _check_fused_output_layer(core.output_layer, model_config)
        tp_group = _tp_group(core)
        processor = partial(fused_output_processor, eaft_config=config, tp_group=tp_group)

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
        # The fused main head never calls the output layer: its calls here are the MTP heads'.
        defer = (
            mtp_layers
            and processor is not None
            and arguments.get("output_processor") is processor
            and getattr(core, "post_process", False)
        )
        deferring = _DeferredOutputLayer(core.output_layer, tp_group) if defer else nullcontext()
        try:
            with deferring:
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
    loss_mask: torch.Tensor | None = None,
    **unused: Any,
) -> torch.Tensor:
    """GPTModel's ``output_processor``: the per-token loss [b, s] of the main head, as
    ``compute_language_model_loss`` returns it, with ``eaft_stats`` on it.

    With ``fused_gradient: forward`` the gradients are formed in the forward pass where the
    model was given the loss mask: the loss function's upstream gradient is then one value on
    every weighted token (Megatron's ``sum(loss * loss_mask)``, scaled); without the mask the
    logits are recomputed in backward."""
    weight = output_layer.weight if output_weight is None else output_weight
    gradient = eaft_config.fused_gradient if loss_mask is not None else "recompute"
    per_token, _ = fused_head_loss(
        hidden_states,
        output_layer,
        weight,
        labels,
        eaft_config,
        tp_group,
        local_top1=False,
        loss_mask=loss_mask if gradient == "forward" else None,
        gradient=gradient,
    )
    loss = per_token.loss
    if eaft_config.kind != "sft" or eaft_config.diagnostics:
        # Without diagnostics, kind sft reports what Megatron's own loss does (no statistics).
        loss.eaft_stats = per_token
    return loss


def fused_head_loss(
    hidden_states: torch.Tensor,
    output_layer: torch.nn.Module,
    weight: torch.Tensor,
    labels: torch.Tensor,
    eaft_config: EAFTConfig,
    tp_group,
    local_top1: bool,
    loss_mask: torch.Tensor | None = None,
    gradient: FusedGradient = "recompute",
) -> tuple[TokenLoss, LocalTop1 | None]:
    """One head's output layer + loss, fused: per-token outputs [b, s] (Megatron's loss layout)
    and, when asked, the shard-local top-1 [s, b] (the logits' layout). ``loss_mask`` [b, s]:
    positions without loss get weight 0 (their gradient, whatever the upstream one, is 0)."""
    hidden = output_layer_input(hidden_states, output_layer, tp_group)
    main_grad, placeholder = _weight_grad_sink(weight, output_layer)
    target = labels.transpose(0, 1).contiguous()
    mask = None if loss_mask is None else loss_mask.transpose(0, 1).contiguous()
    top1 = LocalTop1.empty(target.shape, hidden.dtype, hidden.device) if local_top1 else None
    out = fused_output_weighted_cross_entropy(
        hidden,
        weight,
        target,
        eaft_config,
        tp_group,
        mask,
        chunk_tokens=eaft_config.fused_chunk_tokens or None,
        chunk_memory_bytes=eaft_config.fused_chunk_memory_mib << 20,
        main_grad=main_grad,
        main_grad_placeholder=placeholder,
        top1_out=top1,
        gradient=gradient,
    )
    return TokenLoss(*(t.transpose(0, 1).contiguous() for t in out)), top1


class DeferredLogits:
    """What the output layer gives an MTP head under ``fused_output``: the head's input and
    weight instead of its logits [s, b, V/TP].

    Megatron's ``process_mtp_loss`` hands it to ``compute_language_model_loss``, which runs the
    head's fused loss (:meth:`loss`) and keeps each token's shard-local top-1; Megatron-Core
    >= 0.19 then derives the head's acceptance counts from the logits' top-1 only: ``max(dim=-1)``
    of vocab-sharded logits (``_vocab_parallel_argmax``), ``torch.argmax(dim=-1)`` at TP 1. Those
    are answered from what the loss kept; any other use of the logits raises, naming it.
    """

    def __init__(self, hidden_states: torch.Tensor, weight: torch.Tensor, output_layer, tp_group):
        self.hidden_states = hidden_states
        self.weight = weight
        self.output_layer = output_layer
        self.tp_group = tp_group
        self.top1: LocalTop1 | None = None

    def loss(self, labels: torch.Tensor, config: EAFTConfig) -> torch.Tensor:
        """The head's per-token loss [b, s], as ``compute_language_model_loss`` returns it."""
        per_token, self.top1 = fused_head_loss(
            self.hidden_states, self.output_layer, self.weight, labels, config, self.tp_group, True
        )
        return per_token.loss

    @property
    def shape(self) -> torch.Size:
        return self.size()

    def size(self, dim: int | None = None):
        rows, batch = self.hidden_states.shape[:2]
        if getattr(self.output_layer, "sequence_parallel", False):
            rows *= torch.distributed.get_world_size(self.tp_group)
        shape = torch.Size((rows, batch, self.weight.size(0)))
        return shape if dim is None else shape[dim]

    def max(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits.max(dim=-1)`` on this rank's vocabulary shard: (values, columns) [s, b]."""
        return tuple(self._top1(dim, "max"))

    def argmax(self, dim: int) -> torch.Tensor:
        """``torch.argmax(logits, dim=-1)``: the vocabulary id of each token's top logit."""
        top1 = self._top1(dim, "argmax")
        world = torch.distributed.get_world_size(self.tp_group)
        if world == 1:
            return top1.indices
        # Logits Megatron takes as gathered over TP: its own reduction of the shards' top-1.
        from megatron.core.transformer.multi_token_prediction import _vocab_parallel_argmax

        return _vocab_parallel_argmax(self, self.tp_group, world)

    def _top1(self, dim: int, operation: str) -> LocalTop1:
        if dim not in (-1, 2):
            self._unsupported(f"{operation}(dim={dim})")
        if self.top1 is None:
            self._unsupported(f"{operation} before compute_language_model_loss")
        return self.top1

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.argmax, torch.Tensor.argmax) and isinstance(args[0], cls):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            return args[0].argmax(dim)
        cls._unsupported(getattr(func, "__name__", str(func)))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self._unsupported(f".{name}", AttributeError)

    @staticmethod
    def _unsupported(operation: str, error: type[Exception] = TypeError):
        raise error(
            f"eaft fused_output: Megatron used an MTP head's logits for {operation}, but the "
            "fused path computes no logits (it keeps the loss and each token's top-1); this "
            "Megatron-Core version needs eaft.fused_output=false with MTP layers"
        )


class _DeferredOutputLayer:
    """While entered, the output layer's forward (instance attribute, put back on exit) returns
    a :class:`DeferredLogits` for its input and weight, ColumnParallelLinear's
    ``(output, bias)`` pair with no bias."""

    def __init__(self, output_layer: torch.nn.Module, tp_group):
        self.output_layer = output_layer
        self.tp_group = tp_group
        self.shadowed = None

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, **unused: Any):
        weight = self.output_layer.weight if weight is None else weight
        return DeferredLogits(input_, weight, self.output_layer, self.tp_group), None

    def __enter__(self) -> None:
        self.shadowed = self.output_layer.__dict__.get("forward")
        self.output_layer.forward = self.forward

    def __exit__(self, *exc_info: Any) -> None:
        if self.shadowed is None:
            del self.output_layer.forward
        else:
            self.output_layer.forward = self.shadowed


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
    """GPTModel.forward keyword arguments for a batch (tokens, labels, loss_mask, position_ids, and for
    packed rows cu_seqlens: THD params where the attention supports them, else a mask)."""
    tokens = batch["tokens"]
    inputs: dict[str, Any] = {
        "input_ids": tokens,
        "position_ids": batch["position_ids"],
        "attention_mask": batch.get("attention_mask"),
        "labels": batch["labels"],
        # Megatron's MTP heads take their loss mask from here (all ones without it), and the
        # fused main head forms its gradients in the forward pass only with it.
        "loss_mask": batch["loss_mask"],
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
