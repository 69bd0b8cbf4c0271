"""Pure math of the token-weighted loss: torch and torch.distributed only, no Megatron import."""

from megatron_eaft.ops.config import EAFTConfig
from megatron_eaft.ops.fused_output import fused_output_weighted_cross_entropy
from megatron_eaft.ops.reference import reference_token_loss
from megatron_eaft.ops.vocab_parallel import TokenLoss, vocab_parallel_weighted_cross_entropy
from megatron_eaft.ops.weighting import WEIGHTINGS, confident_conflicts, token_weight

__all__ = [
    "WEIGHTINGS",
    "EAFTConfig",
    "TokenLoss",
    "confident_conflicts",
    "fused_output_weighted_cross_entropy",
    "reference_token_loss",
    "token_weight",
    "vocab_parallel_weighted_cross_entropy",
]
