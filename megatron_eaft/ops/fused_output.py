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

Backward recomputes the logits (one more GEMM than the unfused path: the gradient cannot be
formed in the forward pass because the per-token upstream gradient is only known here), a block
of vocabulary columns at a time over all T tokens: ``g = w * grad * (softmax - onehot)`` for the
block, then ``grad_hidden += g @ weight_block`` and ``grad_weight[block] += g^T @ hidden``
(into ``main_grad`` when Megatron's gradient-accumulation fusion provides one), both
accumulated in fp32. Blocking the vocabulary rather than the tokens makes each weight-gradient
GEMM reduce over every token and write its rows once, as the unfused backward does; token chunks
would re-read and re-write the whole fp32 weight gradient once per chunk, which costs more than
the GEMM itself at small chunks. ``grad_hidden`` is this rank's partial sum over its vocabulary
shard; the caller reduces it over TP as ColumnParallelLinear's backward does.

Every chunk and every block reuses one set of buffers (logits, fp32 working copy, the CPU
products), and on CPU the backward forms a block's gradient a few rows at a time in a
cache-sized fp32 scratch, in place in the block's logits. Fresh chunk-sized tensors per chunk
cost more in page faults than the softmax arithmetic, and whole-block fp32 passes cost four trips
through memory: together 1.21x -> 1.145x the unfused time at T=4096, h=2560, V=151936 (bf16, one
CPU thread; see the README).

Given a ``top1_out`` buffer, the forward also writes each token's shard-local top-1 logit and
its column there (what ``logits.max(dim=-1)`` gives on this rank's shard), O(T): Megatron
derives its MTP acceptance counts from them.

Extra memory: O(C x V/TP) for one chunk's logits and their fp32 copy (a backward block holds as
many logits, its gradient overwrites them; on CPU plus a ``[T, h]`` and a ``[block, h]`` product
in the weight's dtype), plus, during backward, an fp32 ``[T, h]`` hidden-gradient accumulator
and, for a weight without a ``main_grad``, an fp32 weight-sized one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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
    token_outputs,
    topk_entropy,
)

# Working memory of one chunk when the caller gives no chunk size: counted as C x V/TP x 8 bytes
# for bf16 (the forward holds 6: logits and their fp32 copy; a backward block 2, its gradient
# formed in place), so 1 GiB is ~512 tokens at V/TP = 248320.
DEFAULT_CHUNK_MEMORY_BYTES = 1 << 30

# The fp32 rows the backward forms each block's gradient in on CPU: about an L2 cache, where
# four passes over them cost one trip through memory (measured 2.6x faster than whole-block
# passes on a [4096, 32757] block).
GRAD_SCRATCH_BYTES_CPU = 1 << 20

WeightGradPlaceholder = Callable[[torch.Tensor], torch.Tensor | None]


class LocalTop1(NamedTuple):
    """Per position, over this rank's vocabulary shard: ``logits.max(dim=-1)`` of the unfused
    logits (the largest logit, in the logits' dtype, and its column in the shard)."""

    values: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def empty(cls, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> LocalTop1:
        """A buffer for ``top1_out``: ``shape`` the labels', ``dtype`` the logits'."""
        return cls(
            torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=torch.long, device=device),
        )


def chunk_tokens_for_budget(budget_bytes: int, partition_vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk whose logits and their fp32 working copies fit ``budget_bytes``."""
    element = torch.empty((), dtype=dtype).element_size()
    # fp32: the logits are the working copy and the gradient is formed in place.
    per_token = partition_vocab * (4 if element >= 4 else 4 + 2 * element)
    return max(1, budget_bytes // per_token)


def vocab_block_for_chunk(chunk_tokens: int, tokens: int, partition_vocab: int) -> int:
    """Vocabulary columns per backward block: as many logits as one forward chunk holds."""
    return max(1, min(partition_vocab, chunk_tokens * partition_vocab // max(tokens, 1)))


def _no_placeholder(weight: torch.Tensor) -> None:
    return None


def _leading(buffer: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """A contiguous ``[rows, columns]`` view of the start of ``buffer``'s storage (a short last
    chunk or block reuses the full-size buffer instead of allocating its own)."""
    return buffer.view(-1)[: rows * columns].view(rows, columns)


class _FusedOutputWeightedCrossEntropy(torch.autograd.Function):
    """hidden [T, h], weight [V/TP, h], target [T] -> per-token (loss, ce, weight, entropy, p)."""

    @staticmethod
    def chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor, out: torch.Tensor):
        """The output layer on one chunk into ``out``: [C, h] @ [h, V/TP], the weight's dtype."""
        return torch.mm(hidden_chunk, weight.t(), out=out)

    @staticmethod
    def block_buffers(
        rows: int, columns: int, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits in the weight's dtype, their fp32 working copy, None when that is fp32)."""
        logits = torch.empty(rows, columns, dtype=weight.dtype, device=weight.device)
        if weight.dtype == torch.float32:
            return logits, None
        return logits, torch.empty(rows, columns, dtype=torch.float32, device=weight.device)

    @staticmethod
    def grad_scratch(tokens: int, columns: int, weight: torch.Tensor) -> torch.Tensor | None:
        """The fp32 rows :meth:`block_grad_logits_` works in: cache-sized on CPU, the whole
        block on an accelerator (one kernel per pass); None for fp32 logits (worked in place)."""
        if weight.dtype == torch.float32:
            return None
        rows = tokens
        if weight.device.type == "cpu":
            rows = max(1, min(tokens, GRAD_SCRATCH_BYTES_CPU // (4 * max(columns, 1))))
        return torch.empty(rows, columns, dtype=torch.float32, device=weight.device)

    @staticmethod
    def chunk_forward(
        logits: torch.Tensor,
        work: torch.Tensor,
        target: torch.Tensor,
        config: EAFTConfig,
        tp_group: dist.ProcessGroup | None,
    ):
        """One chunk's softmax pass and entropy (the steps of the unfused loss); ``work`` is the
        fp32 buffer the pass runs in (the logits themselves when they are fp32)."""
        entropy_nats = None
        if config.needs_entropy and config.entropy == "topk":
            entropy_nats = topk_entropy(global_topk_values(logits, config.topk, tp_group))
        exact = config.needs_entropy and config.entropy == "exact"
        if work is not logits:
            work.copy_(logits)
        softmax = softmax_pass_(work, target, exact, tp_group, config.check_finite)
        if exact:
            entropy_nats = softmax.entropy_nats
        return softmax, entropy_nats

    @staticmethod
    def block_grad_logits_(
        logits: torch.Tensor,
        scratch: torch.Tensor | None,
        lse: torch.Tensor,
        block_target: torch.Tensor,
        in_block: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        """d loss / d logits of one vocabulary block [T, Vb], in place: scale * (softmax -
        onehot), computed in fp32 and rounded once to the logits' dtype.

        Rows go through ``scratch`` (fp32 ``[R, >= Vb]``; None: fp32 logits, worked on in
        place) R at a time, so on CPU, where R rows fit in cache, the four passes cost one read
        and one write of the block instead of four round trips through memory. The one-hot part
        is a scatter of ``-1`` at each label inside the block (``in_block``; labels outside it
        scatter 0), so no row index is ever read back to the host.
        """
        tokens, width = logits.shape
        group = tokens if scratch is None else scratch.size(0)
        minus_onehot = -in_block.to(torch.float32)
        for start in range(0, tokens, group):
            rows = slice(start, min(start + group, tokens))
            source = logits[rows]
            work = source if scratch is None else _leading(scratch, source.size(0), width)
            # One pass: the upcast (exact) and the shift, as float() then -= would give.
            torch.sub(source, lse[rows].unsqueeze(-1), out=work)
            work.exp_()
            work.scatter_add_(1, block_target[rows].unsqueeze(-1), minus_onehot[rows].unsqueeze(-1))
            work.mul_(scale[rows].unsqueeze(-1))
            if work is not source:
                source.copy_(work)
        return logits

    @staticmethod
    def add_matmul_(
        accumulator: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        product: torch.Tensor | None = None,
    ) -> None:
        """accumulator += left @ right, accumulating in the accumulator's dtype (fp32).
        ``product``: a buffer of the product's shape and the operands' dtype for the CPU path."""
        if left.dtype == accumulator.dtype:
            accumulator.addmm_(left, right)
        elif accumulator.is_cuda:
            # bf16 operands, fp32 output accumulated in place: what Megatron's
            # wgrad_gemm_accum_fp32 does for main_grad, without an fp32 copy of the operands.
            torch.addmm(accumulator, left, right, accumulator.dtype, out=accumulator)
        else:
            # CPU has no mixed-dtype GEMM and an fp32 one is ~3.5x slower than bf16 (measured):
            # a bf16 GEMM over the whole reduction dimension, rounded once, then added.
            accumulator.add_(torch.mm(left, right, out=product))

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
        top1_out: LocalTop1 | None,
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
        # One logits buffer and one fp32 working buffer for every chunk: fresh chunk-sized
        # tensors per chunk cost more in page faults on CPU than the softmax pass itself.
        logits_buffer, work_buffer = fn.block_buffers(
            min(chunk_tokens, tokens), partition_vocab, weight
        )
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, tokens))
            count = rows.stop - rows.start
            logits = fn.chunk_logits(hidden[rows], weight, logits_buffer[:count])
            if top1_out is not None:  # before the softmax pass, which may work on logits in place
                top1_out.values[rows], top1_out.indices[rows] = logits.max(dim=-1)
            work = logits if work_buffer is None else work_buffer[:count]
            softmax, chunk_entropy = fn.chunk_forward(logits, work, target[rows], config, tp_group)
            del logits, work
            ce[rows] = softmax.ce
            logits_max[rows] = softmax.logits_max
            lse[rows] = softmax.logits_max + torch.log(softmax.sum_exp)
            if entropy_nats is not None:
                entropy_nats[rows] = chunk_entropy
            if nonfinite is not None:
                nonfinite[rows] = softmax.nonfinite
        del logits_buffer, work_buffer
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
        tokens, partition_vocab = hidden.size(0), weight.size(0)
        grad_hidden = None
        if want_hidden:
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        accumulator = None
        if want_weight:
            accumulator = ctx.main_grad
            if accumulator is None:
                accumulator = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        local_target, off_shard = shard_targets(target, rank, partition_vocab)
        # Blocks of the vocabulary over all tokens (not chunks of tokens): each block's weight
        # gradient is one GEMM over every token, written once, as in the unfused backward.
        block = vocab_block_for_chunk(ctx.chunk_tokens, tokens, partition_vocab)
        # Buffers reused by every block (see forward); the logits' one then holds the gradient
        # in the operands' dtype, and on CPU the two products rounded to it have theirs.
        logits_buffer = torch.empty(tokens, block, dtype=weight.dtype, device=weight.device)
        scratch = fn.grad_scratch(tokens, block, weight)
        rounded_products = scratch is not None and not hidden.is_cuda
        hidden_product = (
            hidden.new_empty(hidden.shape) if rounded_products and want_hidden else None
        )
        weight_product = None
        if rounded_products and want_weight:
            weight_product = hidden.new_empty(block, hidden.size(1))
        for start in range(0, partition_vocab, block):
            columns = slice(start, min(start + block, partition_vocab))
            width = columns.stop - columns.start
            weight_block = weight[columns]
            logits = fn.chunk_logits(hidden, weight_block, _leading(logits_buffer, tokens, width))
            in_block = ~off_shard & (local_target >= columns.start) & (local_target < columns.stop)
            block_target = (local_target - columns.start).clamp_(0, width - 1)
            grad = fn.block_grad_logits_(logits, scratch, lse, block_target, in_block, scale)
            if grad_hidden is not None:
                fn.add_matmul_(grad_hidden, grad, weight_block, hidden_product)
            if accumulator is not None:
                product = None
                if weight_product is not None:
                    product = _leading(weight_product, width, hidden.size(1))
                fn.add_matmul_(accumulator[columns], grad.t(), hidden, product)
        del logits_buffer, scratch, hidden_product, weight_product
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        grad_weight = None
        if accumulator is not None:
            if ctx.main_grad is not None:
                grad_weight = ctx.main_grad_placeholder(weight)
            else:
                grad_weight = accumulator.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


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
    top1_out: LocalTop1 | None = None,
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
        top1_out: optional :meth:`LocalTop1.empty` of target's shape, filled with each
            position's shard-local top-1 logit and column (``logits.max(dim=-1)``).

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
    top1_1d = None
    if top1_out is not None:
        if top1_out.values.shape != target.shape or top1_out.values.dtype != hidden.dtype:
            raise ValueError(
                f"top1_out holds {top1_out.values.dtype} {tuple(top1_out.values.shape)}, not "
                f"the logits' {hidden.dtype} in the labels' shape {tuple(target.shape)}"
            )
        top1_1d = LocalTop1(*(t.view(-1) for t in top1_out))
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
        top1_1d,
    )
    return TokenLoss(*(t.view(target.shape) for t in outputs))
