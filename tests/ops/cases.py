"""Deterministic loss cases shared by the single-process and the TP tests."""

from __future__ import annotations

import itertools

import torch

from megatron_eaft.ops import EAFTConfig, fused_output

KINDS = ("sft", "dft", "eaft", "sigmoid", "masked")
ENTROPY_MODES = ("topk", "exact")


def all_configs(topk: int = 5) -> list[EAFTConfig]:
    configs = []
    for kind, entropy in itertools.product(KINDS, ENTROPY_MODES):
        norm = "lnv" if (kind, entropy) == ("eaft", "exact") else "lnk"
        configs.append(
            EAFTConfig(
                kind=kind,
                entropy=entropy,
                topk=topk,
                norm=norm,
                alpha=2.0 if kind == "eaft" and entropy == "topk" else 1.0,
                masked_entropy_threshold=0.5,
                masked_prob_threshold=0.5,
            )
        )
    return configs


def make_case(seed: int, seq: int, batch: int, vocab: int, dtype: torch.dtype):
    """Megatron layout: logits [s, b, V] (some rows peaked, some flat), labels [s, b] with
    ignored positions, a loss mask [s, b] and an upstream gradient [s, b]."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(seq, batch, 1, generator=generator) * 6
    logits = (torch.randn(seq, batch, vocab, generator=generator) * scale).to(dtype)
    labels = torch.randint(0, vocab, (seq, batch), generator=generator)
    labels[0, 0] = -100
    loss_mask = (torch.rand(seq, batch, generator=generator) > 0.25).float()
    grad = torch.rand(seq, batch, generator=generator) + 0.5
    return logits, labels, loss_mask, grad


class CountedRecomputes:
    """Counts the fused loss's backward recomputations of the logits (every backward with
    gradient='recompute'; with 'forward' only its fallback for differing upstream values)."""

    def __enter__(self) -> CountedRecomputes:
        function = fused_output._FusedOutputWeightedCrossEntropy
        self.original = function.recompute_gradients_
        self.count = 0

        def counted(*args):
            self.count += 1
            return self.original(*args)

        function.recompute_gradients_ = staticmethod(counted)
        return self

    def __exit__(self, *exc) -> None:
        fused_output._FusedOutputWeightedCrossEntropy.recompute_gradients_ = staticmethod(
            self.original
        )
