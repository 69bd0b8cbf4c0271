"""Forward steps for Megatron's schedules: the micro-batch into GPTModel, the loss out.

Both follow Megatron's contract: ``forward_step(data_iterator, model) -> (output_tensor,
loss_func)`` with ``loss_func(output_tensor) -> (loss_sum, num_tokens, report)`` and report
values ``[sum, count]``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch


def gpt_forward(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Per-token loss [b, s] (or [1, b*s] for THD) from GPTModel with labels.

    A batch with ``cu_seqlens`` is packed THD: Transformer Engine attends within each
    segment, the micro-batch viewed as one sequence. A batch with ``attention_mask`` (packed
    rows for the local attention) passes it through; otherwise Megatron's causal mask applies.
    """
    tokens, position_ids, labels = batch["tokens"], batch["position_ids"], batch["labels"]
    packed_seq_params = None
    if "cu_seqlens" in batch:
        from megatron.core.packed_seq_params import PackedSeqParams

        tokens, position_ids, labels = (t.reshape(1, -1) for t in (tokens, position_ids, labels))
        max_seqlen = int(batch["max_seqlen"])
        packed_seq_params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=batch["cu_seqlens"],
            cu_seqlens_kv=batch["cu_seqlens"],
            max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen,
        )
    return model(
        tokens,
        position_ids,
        batch.get("attention_mask"),
        labels=labels,
        packed_seq_params=packed_seq_params,
    )


def cross_entropy_loss(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Plain SFT: sum of masked per-token CE, the token count, and ``lm loss`` as [sum, count]."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output_tensor.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def cross_entropy_forward_step(data_iterator, model):
    """Megatron-style SFT forward step: plain cross-entropy (evaluation, and the baseline)."""
    batch = next(data_iterator)
    output = gpt_forward(model, batch)
    return output, partial(cross_entropy_loss, batch["loss_mask"])
