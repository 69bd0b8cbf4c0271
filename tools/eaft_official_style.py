"""BENCHMARK BASELINE ONLY (used by tools/bench_loss.py; not part of the megatron_eaft package).

EAFT written the way the authors' official Megatron path does it (their ms-swift fork,
``swift/megatron/trainers/trainer.py``): the model hands the loss function its logits, the loss
function makes a full fp32 copy with ``.float()`` (kept alive next to the bf16 logits while the
loss is computed), takes ``torch.topk(k=20)`` on that copy, turns the renormalised top-K
entropy into a detached weight, and multiplies Megatron's ``vocab_parallel_cross_entropy``
(which makes its own fp32 copy of the logits) by it.

One deliberate change so the timing comparison is fair: the official code takes top-K on the
LOCAL vocabulary shard, which gives every TP rank a different, wrong weight at TP > 1. Here the
local top-K values are all-gathered over the TP group and reduced to the global top-K, the same
exact weight megatron_eaft computes, at the official path's cost.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def _global_topk_of_fp32_copy(
    logits_fp32: torch.Tensor, k: int, tp_group: dist.ProcessGroup
) -> torch.Tensor:
    local = torch.topk(logits_fp32, min(k, logits_fp32.size(-1)), dim=-1).values
    world = dist.get_world_size(tp_group)
    if world == 1:
        return local
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=tp_group)
    return torch.topk(torch.cat(gathered, dim=-1), k, dim=-1).values


def official_style_eaft_loss(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup,
    topk: int = 20,
    normaliser: float | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Per-token ``w * CE`` shaped like ``target``; ``normaliser`` defaults to ln K."""
    normaliser = math.log(topk) if normaliser is None else normaliser
    logits_fp32 = vocab_parallel_logits.float()  # the full-size copy the official path keeps
    with torch.no_grad():
        topk_logits = _global_topk_of_fp32_copy(logits_fp32, topk, tp_group)
        probs = torch.softmax(topk_logits, dim=-1)
        log_probs = torch.log_softmax(topk_logits, dim=-1)
        entropy = -(probs * log_probs).sum(dim=-1)
        weight = (entropy / normaliser).clamp(0.0, 1.0).pow(alpha)
    ce = vocab_parallel_cross_entropy(vocab_parallel_logits, target, tp_group=tp_group)
    return ce * weight
