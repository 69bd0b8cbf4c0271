"""The single-device oracle: the EAFT loss written the obvious way on full-vocabulary logits.

Every test of the fused, vocab-parallel implementation compares against this. It trades memory
for clarity (full fp32 log-softmax, top-K on the full vocabulary) and shares only the
weighting functions with the production path.
"""

from __future__ import annotations

import math

import torch

from megatron_eaft.ops.config import EAFTConfig
from megatron_eaft.ops.vocab_parallel import TokenLoss
from megatron_eaft.ops.weighting import token_weight


def reference_token_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    config: EAFTConfig,
    loss_mask: torch.Tensor | None = None,
) -> TokenLoss:
    """Per-token loss and statistics for full logits ``[..., V]``; differentiable in ``loss``."""
    vocab_size = logits.size(-1)
    config.validate_vocab(vocab_size)
    logits_2d = logits.reshape(-1, vocab_size).float()
    target_1d = target.reshape(-1)
    ignored = target_1d == config.ignore_index
    if loss_mask is not None:
        ignored = ignored | (loss_mask.reshape(-1) == 0)
    safe_target = target_1d.masked_fill(ignored, 0)

    log_probs = torch.log_softmax(logits_2d, dim=-1)
    ce = -log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        target_prob = torch.exp(-ce)
        entropy = None
        if config.needs_entropy:
            # xlogy: 0 log 0 = 0, so a -inf logit (a masked-out id, probability 0) adds nothing.
            if config.entropy == "topk":
                top = torch.topk(logits_2d, config.topk, dim=-1).values
                q = torch.softmax(top, dim=-1)
                nats = -torch.xlogy(q, q).sum(-1)
            else:
                p = log_probs.exp()
                nats = -torch.xlogy(p, p).sum(-1)
            entropy = (nats / config.normaliser(vocab_size)).clamp(0.0, 1.0)
        weight = token_weight(config, entropy, target_prob)
        weight = torch.where(ignored, 0.0, weight)
        target_prob = torch.where(ignored, 0.0, target_prob)
        if entropy is None:
            entropy = torch.full_like(ce, math.nan)

    ce = torch.where(ignored, 0.0, ce)
    # A token of weight 0 adds nothing, even with an infinite CE (its label logit -inf).
    loss = torch.where(weight == 0, 0.0, weight * ce)
    shape = target.shape
    return TokenLoss(
        loss.view(shape),
        ce.detach().view(shape),
        weight.view(shape),
        entropy.view(shape),
        target_prob.view(shape),
    )
