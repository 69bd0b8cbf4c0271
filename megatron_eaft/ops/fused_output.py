"""The output layer and the token-weighted loss as one autograd Function, a chunk of tokens at a
time: the logits of the whole micro-batch never exist.

Layout (Megatron's ColumnParallelLinear output layer): TP rank r holds the weight shard
``[V/TP, h]`` of vocabulary ids ``[r * V/TP, (r + 1) * V/TP)`` and the full hidden states
``[T, h]`` (the caller gathers them over sequence parallelism, as ColumnParallelLinear does);
labels ``[T]`` are the same on every rank.

Forward, per chunk of C tokens: ``logits = hidden_chunk @ weight^T`` (the GEMM accumulates in
fp32 and rounds to the weight's dtype, exactly as ColumnParallelLinear's output, so the fused and
the unfused losses see the same logits), then the steps of
:mod:`megatron_eaft.ops.vocab_parallel` on that chunk: global top-K entropy, Megatron's softmax
pass with its two collectives, the weighting. Kept per token: ``lse = max + log Z``, the weight
and the label, O(T).

Backward recomputes each chunk's logits (one more GEMM per chunk: the gradient cannot be formed
in the forward pass because the per-token upstream gradient is only known here) and forms
``g = w * grad * (softmax - onehot)``, then ``grad_hidden_chunk = g @ weight`` and
``grad_weight += g^T @ hidden_chunk`` in fp32 (into ``main_grad`` when Megatron's
gradient-accumulation fusion provides one). ``grad_hidden`` is this rank's partial sum over its
vocabulary shard; the caller reduces it over TP as ColumnParallelLinear's backward does.

Extra memory: O(C x V/TP) for one chunk's logits, plus, for a bf16/fp16 weight without a
``main_grad``, one fp32 weight-sized gradient accumulator during backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_eaft.ops.config import EAFTConfig
from megatron_eaft.ops.vocab_parallel import (
    TokenLoss,
    global_topk_values,
    group_rank_and_size,
    ignored_positions,
    raise_on_bad_input,
    shard_targets,
    softmax_pass_,
    subtract_target_,
    token_outputs,
    topk_entropy,
)

# Working memory of one chunk when the caller gives no chunk size: ~C x V/TP x 8 bytes for bf16
# (logits, their fp32 copy, the bf16 gradient), so 1 GiB is ~512 tokens at V/TP = 248320.
DEFAULT_CHUNK_MEMORY_BYTES = 1 << 30

WeightGradPlaceholder = Callable[[torch.Tensor], torch.Tensor | None]


def chunk_tokens_for_budget(budget_bytes: int, partition_vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk whose logits and their fp32 working copies fit ``budget_bytes``."""
    element = torch.empty((), dtype=dtype).element_size()
    # fp32: the logits are the working copy and the gradient is formed in place.
    per_token = partition_vocab * (4 if element >= 4 else 4 + 2 * element)
    return max(1, budget_bytes // per_token)


def _no_placeholder(weight: torch.Tensor) -> None:
    return None


class _FusedOutputWeightedCrossEntropy(torch.autograd.Function):
    """hidden [T, h], weight [V/TP, h], target [T] -> per-token (loss, ce, weight, entropy, p)."""

    @staticmethod
    def chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The output layer on one chunk: [C, h] @ [h, V/TP], in the weight's dtype."""
        return torch.matmul(hidden_chunk, weight.t())

    @staticmethod
    def chunk_forward(
        logits: torch.Tensor,
        target: torch.Tensor,
        config: EAFTConfig,
        tp_group: dist.ProcessGroup | None,
    ):
        """One chunk's softmax pass and entropy (the steps of the unfused loss)."""
        entropy_nats = None
        if config.needs_entropy and config.entropy == "topk":
            entropy_nats = topk_entropy(global_topk_values(logits, config.topk, tp_group))
        exact = config.needs_entropy and config.entropy == "exact"
        work = logits.float()  # the logits themselves when they are fp32
        softmax = softmax_pass_(work, target, exact, tp_group, config.check_finite)
        if exact:
            entropy_nats = softmax.entropy_nats
        return softmax, entropy_nats

    @staticmethod
    def chunk_grad_logits(
        logits: torch.Tensor,
        lse: torch.Tensor,
        target: torch.Tensor,
        scale: torch.Tensor,
        rank: int,
    ) -> torch.Tensor:
        """d loss / d logits of one chunk, fp32: scale * (softmax - onehot), in place."""
        grad = logits.float()
        grad -= lse.unsqueeze(-1)
        grad.exp_()
        local_target, off_shard = shard_targets(target, rank, grad.size(-1))
        subtract_target_(grad, local_target, off_shard)
        grad.mul_(scale.unsqueeze(-1))
        return grad

    @staticmethod
    def accumulate_weight_grad_(
        accumulator: torch.Tensor,
        grad_fp32: torch.Tensor,
        grad: torch.Tensor,
        hidden_chunk: torch.Tensor,
    ) -> None:
        """accumulator += grad^T @ hidden_chunk with fp32 accumulation across chunks."""
        if grad.dtype == accumulator.dtype:
            accumulator.addmm_(grad.t(), hidden_chunk)
        elif accumulator.is_cuda:
            # bf16 operands, fp32 output accumulated in place: what Megatron's
            # wgrad_gemm_accum_fp32 does for main_grad, without an fp32 copy of the operands.
            torch.addmm(accumulator, grad.t(), hidden_chunk, accumulator.dtype, out=accumulator)
        else:
            accumulator.addmm_(grad_fp32.t(), hidden_chunk.to(accumulator.dtype))

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        config: EAFTConfig,
        tp_group: dist.ProcessGroup | None,
        loss_mask: torch.Tensor | None,
        chunk_tokens: int,
        main_grad: torch.Tensor | None,
        main_grad_placeholder: WeightGradPlaceholder,
    ):
        fn = _FusedOutputWeightedCrossEntropy
        _, world = group_rank_and_size(tp_group)
        partition_vocab = weight.size(0)
        vocab_size = partition_vocab * world
        config.validate_vocab(vocab_size)
        tokens = hidden.size(0)
        ignored = ignored_positions(target, config, loss_mask)

        ce = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(ce)
        logits_max = torch.empty_like(ce)
        entropy_nats = torch.empty_like(ce) if config.needs_entropy else None
        nonfinite = (
            torch.empty(tokens, dtype=torch.bool, device=hidden.device)
            if config.check_finite
            else None
        )
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, tokens))
            logits = fn.chunk_logits(hidden[rows], weight)
            softmax, chunk_entropy = fn.chunk_forward(logits, target[rows], config, tp_group)
            del logits
            ce[rows] = softmax.ce
            logits_max[rows] = softmax.logits_max
            lse[rows] = softmax.logits_max + torch.log(softmax.sum_exp)
            if entropy_nats is not None:
                entropy_nats[rows] = chunk_entropy
            if nonfinite is not None:
                nonfinite[rows] = softmax.nonfinite
        raise_on_bad_input(target, ignored, nonfinite, logits_max, vocab_size, config, target.shape)
        outputs = token_outputs(ce, entropy_nats, ignored, config, vocab_size)
        token_weight = outputs[2]
        # Rows of weight 0 get lse = +inf: exp(x - lse) = 0, so they add exactly nothing to
        # either gradient whatever their logits (-inf rows included).
        lse.masked_fill_(token_weight == 0, float("inf"))

        ctx.save_for_backward(hidden, weight, target, lse, token_weight)
        ctx.tp_group = tp_group
        ctx.chunk_tokens = chunk_tokens
        ctx.main_grad = main_grad
        ctx.main_grad_placeholder = main_grad_placeholder
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):  # type: ignore[override]
        fn = _FusedOutputWeightedCrossEntropy
        hidden, weight, target, lse, token_weight = ctx.saved_tensors
        rank, _ = group_rank_and_size(ctx.tp_group)
        scale = grad_loss.reshape(-1).float() * token_weight
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        accumulator = None
        if want_weight:
            accumulator = ctx.main_grad
            if accumulator is None:
                accumulator = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        tokens = hidden.size(0)
        for start in range(0, tokens, ctx.chunk_tokens):
            rows = slice(start, min(start + ctx.chunk_tokens, tokens))
            hidden_chunk = hidden[rows]
            logits = fn.chunk_logits(hidden_chunk, weight)
            grad_fp32 = fn.chunk_grad_logits(logits, lse[rows], target[rows], scale[rows], rank)
            del logits
            grad = grad_fp32.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[rows])
            if accumulator is not None:
                fn.accumulate_weight_grad_(accumulator, grad_fp32, grad, hidden_chunk)
        grad_weight = None
        if accumulator is not None:
            if ctx.main_grad is not None:
                grad_weight = ctx.main_grad_placeholder(weight)
            else:
                grad_weight = accumulator.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def fused_output_weighted_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    config: EAFTConfig,
    tp_group: dist.ProcessGroup | None = None,
    loss_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    chunk_memory_bytes: int = DEFAULT_CHUNK_MEMORY_BYTES,
    main_grad: torch.Tensor | None = None,
    main_grad_placeholder: WeightGradPlaceholder = _no_placeholder,
) -> TokenLoss:
    """Per-token EAFT (or baseline) loss of ``hidden @ weight^T`` without the full logits.

    Args:
        hidden: ``[..., h]``, the output layer's input gathered over sequence parallelism.
        weight: this TP rank's output-weight shard ``[V/TP, h]`` (tied: the embedding's).
        target: int labels ``[...]`` (hidden's leading shape), identical on all TP ranks.
        config: the weighting (the same as the unfused loss's).
        tp_group: the group the vocabulary is split over (None: no split).
        loss_mask: optional ``[...]``; zero marks positions without loss.
        chunk_tokens: tokens per chunk; None derives it from ``chunk_memory_bytes``.
        main_grad: an fp32 tensor the weight gradient is added into (Megatron's
            gradient-accumulation fusion); the weight's returned gradient is then
            ``main_grad_placeholder(weight)``.

    The returned ``grad`` of ``hidden`` is this rank's partial sum over its vocabulary shard.
    """
    if hidden.size(-1) != weight.size(-1):
        raise ValueError(
            f"hidden states {tuple(hidden.shape)} and output weight {tuple(weight.shape)} "
            "disagree on the hidden size"
        )
    hidden_2d = hidden.reshape(-1, hidden.size(-1))
    target_1d = target.reshape(-1)
    if hidden_2d.size(0) != target_1d.numel():
        raise ValueError(
            f"hidden states {tuple(hidden.shape)} and labels {tuple(target.shape)} disagree on "
            "the number of positions"
        )
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for_budget(chunk_memory_bytes, weight.size(0), weight.dtype)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} is invalid: must be >= 1")
    if main_grad is not None and main_grad.shape != weight.shape:
        raise ValueError(
            f"main_grad {tuple(main_grad.shape)} does not match the weight {tuple(weight.shape)}"
        )
    mask_1d = None if loss_mask is None else loss_mask.reshape(-1)
    outputs = _FusedOutputWeightedCrossEntropy.apply(
        hidden_2d,
        weight,
        target_1d,
        config,
        tp_group,
        mask_1d,
        chunk_tokens,
        main_grad,
        main_grad_placeholder,
    )
    return TokenLoss(*(t.view(target.shape) for t in outputs))
