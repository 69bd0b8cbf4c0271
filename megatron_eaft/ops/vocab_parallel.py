"""Token-weighted cross-entropy over vocabulary-parallel logits (Megatron's layout), exact under TP.

Layout: TP rank r holds the logits shard ``[..., V/TP]`` for vocabulary ids
``[r * V/TP, (r + 1) * V/TP)``; labels ``[...]`` are the same on every rank. The forward pass is
Megatron's vocab-parallel cross-entropy (max all-reduce, in-place ``exp``, one all-reduce of
the target logit and the partition function) with two additions:

* the global top-K of each position, taken from the untouched shard BEFORE the in-place
  softmax: local top-K, all-gather ``[tokens, TP*k]``, top-K again, so every rank computes the
  identical K values and hence the identical weight;
* for ``entropy="exact"``, ``sum_v exp(x_v) * x_v`` accumulated inside the ``exp`` pass and
  summed in the same all-reduce as the partition function (one more float per token).

The weight is detached; the backward pass is ``w * (softmax - onehot) * grad_output``, written
into the saved softmax in place like Megatron's. The only full-size tensor is the fp32
working copy that Megatron's own cross-entropy makes (none at all for fp32 logits, which are
overwritten in place exactly as Megatron does).

Non-finite logits: -inf is a legal masked-out logit (p = 0) and leaves the loss, entropy and
weights finite in both entropy modes at every TP size. NaN and +inf are errors: with
``check_finite`` the call raises naming the position, on every TP rank alike.

The forward is split into named steps (``softmax_pass_``, ``token_outputs``,
``raise_on_bad_input``, ``subtract_target_``) that the fused output-layer loss
(:mod:`megatron_eaft.ops.fused_output`) runs chunk by chunk.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_eaft.ops.config import EAFTConfig
from megatron_eaft.ops.weighting import token_weight

# Bytes per chunk of the exact-entropy pass, by device type: small enough that the chunk's
# temporaries stay in cache and under a few percent of the shard, large enough to amortise
# kernel launches. On CPU one row at a time (V/TP fp32 values overflow L2 already) runs the
# pass ~2x faster than 8 MiB chunks that spill to L3/DRAM.
_EXACT_PASS_CHUNK_BYTES = {"cpu": 512 << 10}
_EXACT_PASS_CHUNK_BYTES_DEFAULT = 8 << 20
# Values per block of the top-K prefilter (see local_topk_values): a max over 16 interleaved
# columns vectorises well on CPU and leaves only 16 * K candidates per row.
_TOPK_BLOCK_SIZE = 16


class TokenLoss(NamedTuple):
    """Per-token outputs, each shaped like the labels. Only ``loss`` carries a gradient."""

    loss: torch.Tensor  # w * CE, zero where ignored
    ce: torch.Tensor  # unweighted cross-entropy, zero where ignored
    weight: torch.Tensor  # w (detached), zero where ignored
    entropy: torch.Tensor  # normalised entropy Htilde; NaN when not computed
    target_prob: torch.Tensor  # p(y_t), zero where ignored


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group_rank_and_size(group)[1] > 1:
        dist.all_reduce(tensor, op=op, group=group)


def local_topk_values(logits_2d: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row of a [rows, width] tensor, unsorted, in its dtype.

    Exact, and ~4x faster than ``torch.topk`` over the whole row on CPU: column c is put in
    block ``c mod n_blocks``, one max pass gives each block's maximum, and the k blocks with
    the largest maxima always hold the k largest values (if one of them sat in another block,
    the k chosen blocks would each hold a value at least as large, ties included), so the
    final top-k only looks at those k blocks plus the columns left over by the blocking.
    """
    rows, width = logits_2d.shape
    block_size = min(_TOPK_BLOCK_SIZE, width // k)
    # Measured on CPU only (tools/bench_loss.py): on an accelerator torch.topk is one kernel
    # and the extra passes of the prefilter are not known to pay.
    if block_size < 2 or logits_2d.stride(-1) != 1 or logits_2d.device.type != "cpu":
        return torch.topk(logits_2d, k, dim=-1, sorted=False).values
    n_blocks = width // block_size  # >= k
    covered = n_blocks * block_size
    # [rows, block_size, n_blocks]: block b holds columns b, b + n_blocks, b + 2 * n_blocks, ...
    blocked = logits_2d[:, :covered].view(rows, block_size, n_blocks)
    winners = torch.topk(blocked.amax(dim=1), k, dim=-1, sorted=False).indices
    candidates = blocked.gather(2, winners.unsqueeze(1).expand(rows, block_size, k))
    candidates = candidates.reshape(rows, block_size * k)
    if covered < width:
        candidates = torch.cat([candidates, logits_2d[:, covered:]], dim=-1)
    return torch.topk(candidates, k, dim=-1, sorted=False).values


def global_topk_values(
    logits_2d: torch.Tensor, k: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The K largest logits of each row over the whole (TP-sharded) vocabulary, fp32 [rows, K].

    Top-K runs on the shard in its own dtype (bf16 -> fp32 is exact and order-preserving), so
    only the winners are upcast; a shard narrower than K contributes all its columns.
    """
    local = local_topk_values(logits_2d, min(k, logits_2d.size(-1))).float()
    _, world = group_rank_and_size(group)
    if world == 1:
        return local
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    return torch.topk(torch.cat(gathered, dim=-1), k, dim=-1, sorted=False).values


def topk_entropy(topk_values: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax renormalised over the K given logits.

    A -inf among them (a row with fewer than K finite logits) has q = 0 and adds 0 log 0 = 0:
    log q is clamped to the lowest finite value so the product is -0, not 0 * -inf = NaN.
    """
    log_q = torch.log_softmax(topk_values, dim=-1)
    return -(log_q.exp() * log_q.clamp(min=torch.finfo(log_q.dtype).min)).sum(dim=-1)


def normalise_entropy(entropy: torch.Tensor, config: EAFTConfig, vocab_size: int) -> torch.Tensor:
    """Htilde in [0, 1]; exact entropy can exceed ln K, so it is clipped there."""
    normalised = entropy / config.normaliser(vocab_size)
    return normalised.clamp_(0.0, 1.0)


def _exact_pass_chunk_rows(width: int, element_size: int, device: torch.device) -> int:
    chunk_bytes = _EXACT_PASS_CHUNK_BYTES.get(device.type, _EXACT_PASS_CHUNK_BYTES_DEFAULT)
    return max(1, chunk_bytes // (width * element_size))


def exp_rows_(
    shifted: torch.Tensor, with_entropy_term: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn max-shifted logits into exp() in place; return sum(exp) and, if asked, sum(exp * x).

    Without the entropy term this is Megatron's single in-place pass. With it, rows go through
    in cache-sized chunks so the extra product never materialises at the shard's size, and a
    -inf logit (legal: a masked-out id) is first raised to the lowest finite float, whose exp is
    0 as well, so that it adds 0 * lowest = -0 to sum(exp(x) * x) instead of 0 * -inf = NaN.
    """
    if not with_entropy_term:
        torch.exp(shifted, out=shifted)
        return shifted.sum(dim=-1), None
    rows, width = shifted.shape
    chunk = _exact_pass_chunk_rows(width, shifted.element_size(), shifted.device)
    sum_exp = torch.empty(rows, dtype=shifted.dtype, device=shifted.device)
    sum_exp_x = torch.empty_like(sum_exp)
    lowest = torch.finfo(shifted.dtype).min
    # One reused chunk buffer and out= everywhere: five ops per chunk, no allocation in the loop.
    exp_buffer = torch.empty(min(chunk, rows), width, dtype=shifted.dtype, device=shifted.device)
    for start in range(0, rows, chunk):
        x = shifted[start : start + chunk]
        n = x.size(0)
        e = exp_buffer[:n]
        x.clamp_(min=lowest)
        torch.exp(x, out=e)
        # Batched dot products: sum_v e_v * x_v per row without an [rows, V] product tensor.
        torch.bmm(e.unsqueeze(1), x.unsqueeze(2), out=sum_exp_x[start : start + n].view(n, 1, 1))
        x.copy_(e)
        torch.sum(e, dim=-1, out=sum_exp[start : start + n])
    return sum_exp, sum_exp_x


def normalised_entropy(
    vocab_parallel_logits: torch.Tensor, config: EAFTConfig, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Htilde per position ``[...]`` without touching the logits (diagnostics next to another
    loss, e.g. Megatron's own cross-entropy for kind sft). The exact mode reads the shard in
    cache-sized chunks, so nothing of the shard's size is allocated."""
    partition_vocab = vocab_parallel_logits.size(-1)
    vocab_size = partition_vocab * group_rank_and_size(tp_group)[1]
    config.validate_vocab(vocab_size)
    logits_2d = vocab_parallel_logits.reshape(-1, partition_vocab)
    if config.entropy == "topk":
        nats = topk_entropy(global_topk_values(logits_2d, config.topk, tp_group))
    else:
        logits_max = logits_2d.amax(dim=-1).float()
        _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
        rows = logits_2d.size(0)
        sums = torch.empty(2, rows, dtype=torch.float32, device=logits_2d.device)
        chunk = _exact_pass_chunk_rows(partition_vocab, 4, logits_2d.device)
        for start in range(0, rows, chunk):
            x = logits_2d[start : start + chunk].float() - logits_max[start : start + chunk, None]
            x.clamp_(min=torch.finfo(x.dtype).min)  # -inf adds 0, as in exp_rows_
            e = torch.exp(x)
            sums[0, start : start + chunk] = e.sum(dim=-1)
            sums[1, start : start + chunk] = torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).view(-1)
        _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
        nats = torch.log(sums[0]) - sums[1] / sums[0]
    return normalise_entropy(nats, config, vocab_size).view(vocab_parallel_logits.shape[:-1])


class SoftmaxPass(NamedTuple):
    """What the vocab-parallel softmax pass leaves per row (fp32 [rows]); see softmax_pass_."""

    ce: torch.Tensor  # log Z - x_y: the unweighted cross-entropy, before masking
    sum_exp: torch.Tensor  # Z = sum_v exp(x_v - max), over the whole vocabulary
    logits_max: torch.Tensor  # the global row maximum the logits were shifted by
    entropy_nats: torch.Tensor | None  # exact entropy (nats) when asked for, else None
    nonfinite: torch.Tensor | None  # bool: a NaN or +inf logit, or no finite one (when checked)
    local_target: torch.Tensor  # the label's column in this shard (0 where off the shard)
    off_shard: torch.Tensor  # bool: the label lies in another rank's shard


def shard_targets(
    target_1d: torch.Tensor, rank: int, partition_vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each label in this rank's shard, 0 where off it; whether it is off it)."""
    vocab_start = rank * partition_vocab
    off_shard = (target_1d < vocab_start) | (target_1d >= vocab_start + partition_vocab)
    return (target_1d - vocab_start).masked_fill(off_shard, 0), off_shard


def softmax_pass_(
    work: torch.Tensor,
    target_1d: torch.Tensor,
    with_exact_entropy: bool,
    tp_group: dist.ProcessGroup | None,
    check_finite: bool,
) -> SoftmaxPass:
    """Megatron's vocab-parallel cross-entropy forward on fp32 rows ``[rows, V/TP]``, in place.

    ``work`` ends as ``exp(x - max)`` (divide by ``sum_exp`` for the softmax). Two collectives:
    the MAX of the row maxima and one SUM of everything summed over the vocabulary (target logit,
    partition function, the exact entropy's ``sum exp(x) * x`` and the non-finite flag). The flag
    is taken from each shard BEFORE the MAX: gloo's MAX drops NaN, so a NaN on another rank's
    shard would otherwise go unseen by the check (while still making every rank's loss NaN).
    """
    rank, _ = group_rank_and_size(tp_group)
    # amax, not max(): on CPU max() also produces indices and runs ~6x slower.
    logits_max = torch.amax(work, dim=-1)
    local_nonfinite = None
    if check_finite:
        local_nonfinite = (torch.isnan(logits_max) | (logits_max == math.inf)).float()
    _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
    work -= logits_max.unsqueeze(-1)

    local_target, off_shard = shard_targets(target_1d, rank, work.size(-1))
    predicted = work.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    predicted.masked_fill_(off_shard, 0.0)

    sum_exp, sum_exp_x = exp_rows_(work, with_entropy_term=with_exact_entropy)
    partials = [predicted, sum_exp]
    if with_exact_entropy:
        partials.append(sum_exp_x)
    if local_nonfinite is not None:
        partials.append(local_nonfinite)
    reduced = torch.stack(partials)
    _all_reduce(reduced, dist.ReduceOp.SUM, tp_group)
    predicted, sum_exp = reduced[0], reduced[1]
    log_z = torch.log(sum_exp)
    entropy_nats = log_z - reduced[2] / sum_exp if with_exact_entropy else None
    nonfinite = None
    if local_nonfinite is not None:
        # A row whose every logit is -inf has no distribution: as bad as a NaN.
        nonfinite = (reduced[-1] > 0) | (logits_max == -math.inf)
    return SoftmaxPass(
        log_z - predicted, sum_exp, logits_max, entropy_nats, nonfinite, local_target, off_shard
    )


def token_outputs(
    ce: torch.Tensor,
    entropy_nats: torch.Tensor | None,
    ignored: torch.Tensor,
    config: EAFTConfig,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, weight, entropy, target_prob) per row from the cross-entropy and entropy.

    Ignored rows are zeroed with ``where``, not a multiply, so whatever their logits hold
    (NaN, inf) stays out of the sums; a row of weight 0 adds 0 even where its CE is infinite
    (a -inf label logit: dft's p * CE tends to 0 there).
    """
    target_prob = torch.exp(-ce)
    if entropy_nats is not None:
        entropy = normalise_entropy(entropy_nats, config, vocab_size)
        weight = token_weight(config, entropy, target_prob)
    else:
        entropy = torch.full_like(ce, math.nan)
        weight = token_weight(config, None, target_prob)
    zero = ce.new_zeros(())
    ce = torch.where(ignored, zero, ce)
    weight = torch.where(ignored, zero, weight)
    target_prob = torch.where(ignored, zero, target_prob)
    loss = torch.where(weight == 0, zero, weight * ce)
    return loss, ce, weight, entropy, target_prob


def ignored_positions(
    target_1d: torch.Tensor, config: EAFTConfig, loss_mask: torch.Tensor | None
) -> torch.Tensor:
    ignored = target_1d == config.ignore_index
    if loss_mask is not None:
        ignored |= loss_mask.reshape(-1) == 0
    return ignored


def checks_sync(config: EAFTConfig, device: torch.device) -> bool:
    """Whether the input checks read flags on the host (and so raise readable errors).

    On CPU a host read costs nothing (every op has finished), so the label check always runs
    there. On an accelerator it is a device sync per call, taken only with check_finite;
    otherwise labels are checked by an asynchronous device-side assertion (no sync, the run
    aborts with the message below on the next synchronising op) and logits are not checked.
    """
    return config.check_finite or device.type == "cpu"


_BAD_LABEL = "a label is outside the vocabulary (not ignore_index, not loss-masked)"


def raise_on_bad_input(
    target_1d: torch.Tensor,
    ignored: torch.Tensor,
    nonfinite: torch.Tensor | None,
    logits_max: torch.Tensor,
    vocab_size: int,
    config: EAFTConfig,
    label_shape: torch.Size,
) -> None:
    """Labels in [0, V) and, with check_finite, finite logits; one host read for both.

    Every TP rank sees the same flags (labels are replicated, the finite flag is all-reduced),
    so every rank raises alike and none hangs in a later collective.
    """
    bad_label = ~ignored & ((target_1d < 0) | (target_1d >= vocab_size))
    if not checks_sync(config, target_1d.device):
        torch._assert_async(~bad_label.any(), _BAD_LABEL)
        return
    flags = [bad_label.any()]
    if nonfinite is not None:
        flags.append(nonfinite.any())
    any_bad_label, *any_nonfinite = torch.stack(flags).tolist()
    if any_bad_label:
        flat = int(bad_label.nonzero()[0, 0])
        raise ValueError(
            f"label {int(target_1d[flat])} at position {_position(flat, label_shape)} (of labels "
            f"shaped {tuple(label_shape)}) is outside the vocabulary [0, {vocab_size}); "
            "mark positions without loss with ignore_index or the loss mask"
        )
    if any_nonfinite and any_nonfinite[0]:
        assert nonfinite is not None
        flat = int(nonfinite.nonzero()[0, 0])
        raise FloatingPointError(
            f"non-finite logits (a NaN or +inf, or no finite logit; row max "
            f"{float(logits_max[flat])}) at position {_position(flat, label_shape)} of labels "
            f"shaped {tuple(label_shape)}: the model diverged or its input is corrupt "
            "(-inf alone is a legal masked-out logit)"
        )


def _position(flat: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


class _VocabParallelWeightedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        vocab_parallel_logits: torch.Tensor,
        target: torch.Tensor,
        config: EAFTConfig,
        tp_group: dist.ProcessGroup | None,
        loss_mask: torch.Tensor | None,
    ):
        _, world = group_rank_and_size(tp_group)
        partition_vocab = vocab_parallel_logits.size(-1)
        vocab_size = partition_vocab * world
        config.validate_vocab(vocab_size)
        logits_2d = vocab_parallel_logits.reshape(-1, partition_vocab)
        target_1d = target.reshape(-1)
        if logits_2d.size(0) != target_1d.numel():
            raise ValueError(
                f"logits {tuple(vocab_parallel_logits.shape)} and labels {tuple(target.shape)} "
                "disagree on the number of positions"
            )
        ignored = ignored_positions(target_1d, config, loss_mask)

        entropy_nats = None
        if config.needs_entropy and config.entropy == "topk":
            entropy_nats = topk_entropy(global_topk_values(logits_2d, config.topk, tp_group))

        # From here on this is Megatron's vocab-parallel cross-entropy. The working tensor is
        # a copy for bf16/fp16 and the input itself for fp32; it becomes the saved softmax (kept
        # un-viewed: autograd refuses saved views whose base was modified in place).
        work_full = vocab_parallel_logits.float()
        work = work_full.view(-1, partition_vocab)
        exact = config.needs_entropy and config.entropy == "exact"
        softmax = softmax_pass_(work, target_1d, exact, tp_group, config.check_finite)
        raise_on_bad_input(
            target_1d,
            ignored,
            softmax.nonfinite,
            softmax.logits_max,
            vocab_size,
            config,
            target.shape,
        )
        work.div_(softmax.sum_exp.unsqueeze(-1))
        if exact:
            entropy_nats = softmax.entropy_nats
        outputs = token_outputs(softmax.ce, entropy_nats, ignored, config, vocab_size)

        weight = outputs[2]
        ctx.save_for_backward(work_full, softmax.off_shard, softmax.local_target, weight)
        shape = target.shape
        outputs = tuple(t.view(shape) for t in outputs)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):  # type: ignore[override]
        softmax, off_shard, local_target, weight = ctx.saved_tensors
        grad = softmax.view(-1, softmax.size(-1))  # reused in place, as Megatron does
        subtract_target_(grad, local_target, off_shard)
        grad.mul_((grad_loss.reshape(-1) * weight).unsqueeze(-1))
        return softmax, None, None, None, None


def subtract_target_(
    softmax: torch.Tensor, local_target: torch.Tensor, off_shard: torch.Tensor
) -> None:
    """softmax - onehot(label) in place: d CE / d logits on this rank's shard."""
    rows = torch.arange(softmax.size(0), device=softmax.device)
    softmax[rows, local_target] -= (~off_shard).to(softmax.dtype)


def vocab_parallel_weighted_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    config: EAFTConfig,
    tp_group: dist.ProcessGroup | None = None,
    loss_mask: torch.Tensor | None = None,
) -> TokenLoss:
    """Per-token EAFT (or baseline) loss on a vocabulary shard; see the module docstring.

    Args:
        vocab_parallel_logits: ``[..., V/TP]`` in fp32, bf16 or fp16. fp32 input is overwritten
            (it becomes the softmax), exactly like Megatron's cross-entropy.
        target: int labels ``[...]``, identical on all TP ranks; ``config.ignore_index`` marks
            positions without loss.
        config: the weighting.
        tp_group: the tensor-parallel group the vocabulary is split over (None: no split).
        loss_mask: optional ``[...]``; zero marks positions without loss.
    """
    return TokenLoss(
        *_VocabParallelWeightedCrossEntropy.apply(
            vocab_parallel_logits, target, config, tp_group, loss_mask
        )
    )
