"""Entropy-Adaptive Fine-Tuning (EAFT) for Megatron-Core.

The loss (``EAFTConfig``, ``vocab_parallel_weighted_cross_entropy``, ``reference_token_loss``)
needs only torch; the Megatron integration (``install_eaft_loss``, ``EAFTForwardStep``) is
imported on first use so that ``import megatron_eaft`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "EAFTConfig": "megatron_eaft.ops",
    "TokenLoss": "megatron_eaft.ops",
    "vocab_parallel_weighted_cross_entropy": "megatron_eaft.ops",
    "reference_token_loss": "megatron_eaft.ops",
    "install_eaft_loss": "megatron_eaft.megatron.loss",
    "eaft_loss_func": "megatron_eaft.megatron.loss",
    "EAFTForwardStep": "megatron_eaft.megatron.loss",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_eaft' has no attribute {name!r}")
