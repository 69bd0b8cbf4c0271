"""Token weightings: one function per kind, all mapping detached per-token statistics to w_t.

Every weighting receives the normalised entropy ``entropy`` (Htilde in [0, 1], or None when
the kind does not need it and diagnostics are off) and the target probability ``target_prob``
(p(y_t), detached), both fp32 of shape [tokens]. Adding a weighting is adding a function
here and a name in :data:`megatron_eaft.ops.config.KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_eaft.ops.config import EAFTConfig

Weighting = Callable[[EAFTConfig, torch.Tensor | None, torch.Tensor], torch.Tensor]


def sft_weight(config: EAFTConfig, entropy: torch.Tensor | None, target_prob: torch.Tensor):
    return torch.ones_like(target_prob)


def dft_weight(config: EAFTConfig, entropy: torch.Tensor | None, target_prob: torch.Tensor):
    # Dynamic Fine-Tuning: scale each token by its own (detached) probability.
    return target_prob.clone()


def eaft_weight(config: EAFTConfig, entropy: torch.Tensor | None, target_prob: torch.Tensor):
    assert entropy is not None
    if config.alpha == 1.0:
        return entropy.clone()
    return entropy.pow(config.alpha)


def sigmoid_weight(config: EAFTConfig, entropy: torch.Tensor | None, target_prob: torch.Tensor):
    assert entropy is not None
    return torch.sigmoid(config.sigmoid_scale * (entropy - config.sigmoid_center))


def masked_weight(config: EAFTConfig, entropy: torch.Tensor | None, target_prob: torch.Tensor):
    assert entropy is not None
    dropped = (entropy < config.masked_entropy_threshold) & (
        target_prob < config.masked_prob_threshold
    )
    return (~dropped).to(target_prob.dtype)


WEIGHTINGS: dict[str, Weighting] = {
    "sft": sft_weight,
    "dft": dft_weight,
    "eaft": eaft_weight,
    "sigmoid": sigmoid_weight,
    "masked": masked_weight,
}


def token_weight(
    config: EAFTConfig, entropy: torch.Tensor | None, target_prob: torch.Tensor
) -> torch.Tensor:
    return WEIGHTINGS[config.kind](config, entropy, target_prob)


def confident_conflicts(
    config: EAFTConfig, entropy: torch.Tensor | None, target_prob: torch.Tensor
) -> torch.Tensor | None:
    """Tokens the model is sure about (low entropy) yet wrong on (low target probability)."""
    if entropy is None:
        return None
    return (entropy < config.conflict_entropy_threshold) & (
        target_prob < config.conflict_prob_threshold
    )
