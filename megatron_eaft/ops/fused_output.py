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

With ``gradient="forward"`` both gradients are formed in the forward pass instead, one GEMM
fewer (3, as unfused): after each chunk's softmax pass its ``g = w * (softmax - onehot)`` for an
upstream gradient of 1, ``hidden_grad[chunk] = g @ weight`` and ``weight_grad += g^T @
hidden_chunk`` (fp32, read and written once per chunk). Backward scales each hidden-gradient row
by its token's upstream gradient (exact for any) and the weight gradient by the one upstream
value all tokens of nonzero weight share (Megatron's ``sum(loss * loss_mask)``, scaled, with the
loss mask given here); where they differ it is recomputed as above (checked on the host where
that is free, else by an asynchronous device assertion). Costs an fp32 weight-sized buffer and
a ``[T, h]`` one from forward to backward.

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

import functools
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_eaft.ops import vocab_parallel
from megatron_eaft.ops.config import FUSED_GRADIENTS, EAFTConfig, FusedGradient
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


def chunk_tokens_for_budget(
    budget_bytes: int,
    partition_vocab: int,
    dtype: torch.dtype,
    gradient: FusedGradient = "recompute",
) -> int:
    """Tokens per chunk whose logits and their fp32 working copies fit ``budget_bytes``."""
    element = torch.empty((), dtype=dtype).element_size()
    # fp32 logits are their own working copy, unless the forward pass forms the gradient from
    # them after the softmax pass (then it needs them intact, and a copy).
    fp32_per_value = 8 if gradient == "forward" else 4
    per_value = fp32_per_value if element >= 4 else 4 + 2 * element
    return max(1, budget_bytes // (partition_vocab * per_value))


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
        rows: int, columns: int, weight: torch.Tensor, keep_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits in the weight's dtype, their fp32 working copy; None when the logits are fp32
        and need not outlive the softmax pass, which then runs on them in place)."""
        logits = torch.empty(rows, columns, dtype=weight.dtype, device=weight.device)
        if weight.dtype == torch.float32 and not keep_logits:
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
    def add_weight_grad_(
        accumulator: torch.Tensor,
        grad_logits: torch.Tensor,
        hidden_rows: torch.Tensor,
        product: torch.Tensor | None,
    ) -> None:
        """accumulator [V/TP, h] += grad_logits^T @ hidden_rows, in blocks of ``product``'s rows
        where the CPU needs a rounded product (else one GEMM)."""
        fn = _FusedOutputWeightedCrossEntropy
        if product is None:
            fn.add_matmul_(accumulator, grad_logits.t(), hidden_rows)
            return
        rows = product.size(0)
        for start in range(0, accumulator.size(0), rows):
            columns = slice(start, min(start + rows, accumulator.size(0)))
            fn.add_matmul_(
                accumulator[columns],
                grad_logits[:, columns].t(),
                hidden_rows,
                product[: columns.stop - columns.start],
            )

    @staticmethod
    def recompute_gradients_(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        scale: torch.Tensor,
        chunk_tokens: int,
        tp_group: dist.ProcessGroup | None,
        grad_hidden: torch.Tensor | None,
        accumulator: torch.Tensor | None,
    ) -> None:
        """Both gradients from recomputed logits, added into ``grad_hidden`` (fp32 [T, h]) and
        ``accumulator`` (fp32 [V/TP, h]) where given: a block of vocabulary columns at a time
        over all tokens, so each block's weight gradient is one GEMM over every token, written
        once, as in the unfused backward."""
        fn = _FusedOutputWeightedCrossEntropy
        rank, _ = group_rank_and_size(tp_group)
        tokens, partition_vocab = hidden.size(0), weight.size(0)
        local_target, off_shard = shard_targets(target, rank, partition_vocab)
        block = vocab_block_for_chunk(chunk_tokens, tokens, partition_vocab)
        # Buffers reused by every block (see forward); the logits' one then holds the gradient
        # in the operands' dtype, and on CPU the two products rounded to it have theirs.
        logits_buffer = torch.empty(tokens, block, dtype=weight.dtype, device=weight.device)
        scratch = fn.grad_scratch(tokens, block, weight)
        rounded_products = scratch is not None and not hidden.is_cuda
        hidden_product = (
            hidden.new_empty(hidden.shape) if rounded_products and grad_hidden is not None else None
        )
        weight_product = None
        if rounded_products and accumulator is not None:
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

    @staticmethod
    def one_upstream_value(
        grad_loss: torch.Tensor, token_weight: torch.Tensor, config: EAFTConfig
    ) -> torch.Tensor | None:
        """The upstream gradient shared by every token of nonzero weight (0-dim; 0 when there
        is none), or None when they differ, for the weight gradient formed in the forward pass.

        Megatron's loss functions give ``c * loss_mask`` and the fused loss knows the mask, so
        the weighted tokens share one value. Where a host read is free (CPU) or allowed
        (check_finite), differing values return None (the caller recomputes); otherwise an
        asynchronous device assertion checks it without a sync.
        """
        weighted = token_weight != 0
        highest = torch.where(weighted, grad_loss, -math.inf).amax()
        lowest = torch.where(weighted, grad_loss, math.inf).amin()
        any_weighted = weighted.any()
        shared = (highest == lowest) | ~any_weighted
        # Looked up on the module: one switch for every input check (tools/bench_fused.py).
        if not vocab_parallel.checks_sync(config, grad_loss.device):
            torch._assert_async(shared, _DIFFERING_UPSTREAM)
        elif not bool(shared):
            return None
        return torch.where(any_weighted, highest, 0.0)

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
        gradient_in_forward: bool,
    ):
        fn = _FusedOutputWeightedCrossEntropy
        _, world = group_rank_and_size(tp_group)
        partition_vocab = weight.size(0)
        vocab_size = partition_vocab * world
        config.validate_vocab(vocab_size)
        tokens = hidden.size(0)
        ignored = ignored_positions(target, config, loss_mask)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gradient_in_forward = gradient_in_forward and (want_hidden or want_weight)

        outputs = [
            torch.empty(tokens, dtype=torch.float32, device=hidden.device)
            for _ in TokenLoss._fields
        ]
        lse = torch.empty_like(outputs[0])
        logits_max = torch.empty_like(outputs[0])
        nonfinite = (
            torch.empty(tokens, dtype=torch.bool, device=hidden.device)
            if config.check_finite
            else None
        )
        # One logits buffer and one fp32 working buffer for every chunk: fresh chunk-sized
        # tensors per chunk cost more in page faults on CPU than the softmax pass itself.
        chunk_rows = min(chunk_tokens, tokens)
        logits_buffer, work_buffer = fn.block_buffers(
            chunk_rows, partition_vocab, weight, keep_logits=gradient_in_forward
        )
        formed = None
        if gradient_in_forward:
            formed = _FormedGradients.empty(
                hidden, weight, chunk_rows, want_hidden, want_weight, work_buffer
            )
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, tokens))
            count = rows.stop - rows.start
            logits = fn.chunk_logits(hidden[rows], weight, logits_buffer[:count])
            if top1_out is not None:  # before the softmax pass, which may work on logits in place
                top1_out.values[rows], top1_out.indices[rows] = logits.max(dim=-1)
            work = logits if work_buffer is None else work_buffer[:count]
            softmax, chunk_entropy = fn.chunk_forward(logits, work, target[rows], config, tp_group)
            del work
            chunk_outputs = token_outputs(
                softmax.ce, chunk_entropy, ignored[rows], config, vocab_size
            )
            for whole, part in zip(outputs, chunk_outputs, strict=True):
                whole[rows] = part
            logits_max[rows] = softmax.logits_max
            chunk_lse = softmax.logits_max + torch.log(softmax.sum_exp)
            # Rows of weight 0 get lse = +inf: exp(x - lse) = 0, so they add exactly nothing to
            # either gradient whatever their logits (-inf rows included).
            chunk_lse.masked_fill_(chunk_outputs[2] == 0, math.inf)
            lse[rows] = chunk_lse
            if nonfinite is not None:
                nonfinite[rows] = softmax.nonfinite
            if formed is not None:
                grad = fn.block_grad_logits_(
                    logits,
                    formed.scratch,
                    chunk_lse,
                    softmax.local_target,
                    ~softmax.off_shard,
                    chunk_outputs[2],
                )
                formed.add_chunk_(rows, grad, hidden[rows], weight)
            del logits
        del logits_buffer, work_buffer
        if formed is not None:
            formed.drop_working_buffers()  # only the gradients live on until backward
        raise_on_bad_input(target, ignored, nonfinite, logits_max, vocab_size, config, target.shape)

        ctx.save_for_backward(hidden, weight, target, lse, outputs[2])
        ctx.config = config
        ctx.tp_group = tp_group
        ctx.chunk_tokens = chunk_tokens
        ctx.main_grad = main_grad
        ctx.main_grad_placeholder = main_grad_placeholder
        ctx.formed = formed
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):  # type: ignore[override]
        fn = _FusedOutputWeightedCrossEntropy
        hidden, weight, target, lse, token_weight = ctx.saved_tensors
        grad_loss = grad_loss.reshape(-1).float()
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        formed: _FormedGradients | None = ctx.formed
        ctx.formed = None
        grad_hidden, upstream = None, None
        recompute_hidden = want_hidden and formed is None
        recompute_weight = want_weight and formed is None
        if formed is not None:
            if want_hidden:
                grad_hidden = formed.scaled_hidden_grad(grad_loss)
            if want_weight:
                upstream = fn.one_upstream_value(grad_loss, token_weight, ctx.config)
                if upstream is None:
                    # Differing upstream values: the weight gradient from recomputed logits.
                    _warn_once_recomputing()
                    formed.weight_grad = None
                    recompute_weight = True
        accumulator = None
        if want_weight:
            accumulator = ctx.main_grad
            if upstream is not None:
                if accumulator is None:
                    accumulator = formed.weight_grad.mul_(upstream)
                else:
                    accumulator.addcmul_(formed.weight_grad, upstream)
            elif accumulator is None:
                accumulator = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if recompute_hidden or recompute_weight:
            hidden_sum = None
            if recompute_hidden:
                hidden_sum = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
            fn.recompute_gradients_(
                hidden,
                weight,
                target,
                lse,
                grad_loss * token_weight,
                ctx.chunk_tokens,
                ctx.tp_group,
                hidden_sum,
                accumulator if recompute_weight else None,
            )
            if hidden_sum is not None:
                grad_hidden = hidden_sum.to(hidden.dtype)
        grad_weight = None
        if accumulator is not None:
            if ctx.main_grad is not None:
                grad_weight = ctx.main_grad_placeholder(weight)
            else:
                grad_weight = accumulator.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


_logger = logging.getLogger(__name__)


@functools.cache
def _warn_once_recomputing() -> None:
    _logger.warning(
        "eaft fused_gradient='forward': the upstream gradient differs between weighted tokens "
        "(not sum(loss * loss_mask) times a constant, or the loss mask was not given to the "
        "model), so the output weight's gradient is recomputed in backward: slower than "
        "fused_gradient='recompute'"
    )


_DIFFERING_UPSTREAM = (
    "eaft fused_gradient='forward' formed the output weight's gradient in the forward pass for "
    "one upstream gradient shared by every weighted token, but they differ (a loss function "
    "that is not sum(loss * loss_mask) times a constant); use fused_gradient='recompute'"
)


class _FormedGradients:
    """The gradients formed in the forward pass for an upstream gradient of 1 per token: the
    hidden states' ``[T, h]`` (rows scaled by each token's upstream value in backward, exact for
    any) and the output weight's fp32 ``[V/TP, h]`` (one upstream value for all tokens).

    ``chunk_rows`` x V/TP logits make each chunk's weight-gradient GEMM; its fp32 accumulator is
    read and written once per chunk.
    """

    def __init__(
        self,
        hidden_grad: torch.Tensor | None,
        weight_grad: torch.Tensor | None,
        scratch: torch.Tensor | None,
        weight_product: torch.Tensor | None,
    ):
        self.hidden_grad = hidden_grad
        self.weight_grad = weight_grad
        self.scratch = scratch
        self.weight_product = weight_product

    @classmethod
    def empty(
        cls,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        chunk_rows: int,
        want_hidden: bool,
        want_weight: bool,
        work_buffer: torch.Tensor | None,
    ) -> _FormedGradients:
        fn = _FusedOutputWeightedCrossEntropy
        partition_vocab, hidden_size = weight.shape
        hidden_grad = hidden.new_empty(hidden.shape) if want_hidden else None
        weight_grad = None
        if want_weight:
            weight_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        scratch = fn.grad_scratch(chunk_rows, partition_vocab, weight)
        if scratch is not None and work_buffer is not None and weight.device.type != "cpu":
            scratch = work_buffer  # free once the softmax pass is done: the chunk's fp32 rows
        weight_product = None
        if want_weight and scratch is not None and not weight.is_cuda:
            # The CPU's rounded [rows, h] products, as many values as a chunk's logits.
            rows = max(1, min(partition_vocab, chunk_rows * partition_vocab // hidden_size))
            weight_product = weight.new_empty(rows, hidden_size)
        return cls(hidden_grad, weight_grad, scratch, weight_product)

    def drop_working_buffers(self) -> None:
        self.scratch = None
        self.weight_product = None

    def add_chunk_(
        self,
        rows: slice,
        grad_logits: torch.Tensor,
        hidden_rows: torch.Tensor,
        weight: torch.Tensor,
    ) -> None:
        """One chunk's share: its rows of the hidden gradient, its sum into the weight's."""
        fn = _FusedOutputWeightedCrossEntropy
        if self.hidden_grad is not None:
            torch.mm(grad_logits, weight, out=self.hidden_grad[rows])
        if self.weight_grad is not None:
            fn.add_weight_grad_(self.weight_grad, grad_logits, hidden_rows, self.weight_product)

    def scaled_hidden_grad(self, grad_loss: torch.Tensor) -> torch.Tensor:
        assert self.hidden_grad is not None
        return torch.mul(self.hidden_grad, grad_loss.unsqueeze(-1), out=self.hidden_grad)


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
    gradient: FusedGradient = "recompute",
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
        gradient: ``recompute`` (backward recomputes the logits: exact for any upstream
            gradient) or ``forward`` (both gradients formed in the forward pass, one GEMM
            fewer; the weight's is exact when every token of nonzero weight gets the same
            upstream gradient, as from ``sum(loss * loss_mask) * c`` with ``loss_mask`` given
            here: see :meth:`_FusedOutputWeightedCrossEntropy.one_upstream_value`). Without
            autograd (evaluation) both only compute the loss.

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
    if gradient not in FUSED_GRADIENTS:
        raise ValueError(f"gradient={gradient!r} is invalid: must be one of {FUSED_GRADIENTS}")
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for_budget(
            chunk_memory_bytes, weight.size(0), weight.dtype, gradient
        )
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
        gradient == "forward" and torch.is_grad_enabled(),
    )
    return TokenLoss(*(t.view(target.shape) for t in outputs))
