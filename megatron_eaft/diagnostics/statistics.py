"""Accumulators for EAFT's per-token picture: histograms and agreement sums, in torch only.

Everything a dataset pass collects is a SUM over tokens, so accumulators from different
micro-batches merge by addition and data-parallel ranks combine with one all-reduce of one
flat float64 tensor. Tensor-parallel ranks need no reduction: the vocab-parallel loss gives
every TP rank identical per-token statistics.

* :class:`TokenHistogram`: a 2-D histogram of (normalised entropy, target probability) over
  loss-masked tokens, the EAFT paper's key picture, plus scalar sums (entropy, target
  probability, cross-entropy, confident conflicts, and the mean weight every loss kind would
  give these tokens). The 1-D entropy histogram is its row sums.
* :class:`EntropyAgreement`: how close the top-K entropy estimate is to the exact entropy:
  Pearson correlation (from running sums) and the mean absolute error per bin of exact entropy.
  Top-K entropy saturates at ln K while exact entropy reaches ln V, so a single correlation
  hides where they disagree; the per-bin error shows it.

Bins are half-open ``[e_i, e_{i+1})`` except the last, which includes 1.0 (numpy's convention).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from megatron_eaft.ops.config import KINDS, EAFTConfig
from megatron_eaft.ops.weighting import confident_conflicts, token_weight

_SCALARS = ("tokens", "entropy", "target_prob", "ce", "conflicts")


def bin_edges(bins: int) -> torch.Tensor:
    """``bins + 1`` equally spaced float64 edges over [0, 1]."""
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"the number of bins must be a positive integer, got {bins!r}")
    return torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)


def bin_index(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin of each value in [0, 1] for ``edges`` (last bin closed; out-of-range values clamp)."""
    inner = edges[1:-1].to(device=values.device, dtype=torch.float64)
    return torch.bucketize(values.to(torch.float64), inner, right=True)


def _masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1)[keep]


def _keep_mask(reference: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    if loss_mask is None:
        return torch.ones(reference.numel(), dtype=torch.bool, device=reference.device)
    if loss_mask.numel() != reference.numel():
        raise ValueError(
            f"loss_mask has {loss_mask.numel()} positions but the statistics have "
            f"{reference.numel()}"
        )
    return loss_mask.reshape(-1).to(reference.device) != 0


class _SumState:
    """A flat float64 tensor of sums with named views; reduces with one all-reduce."""

    def __init__(self, sizes: dict[str, tuple[int, ...]], device: torch.device | str) -> None:
        self._shapes = dict(sizes)
        total = sum(math.prod(shape) for shape in sizes.values())
        self.flat = torch.zeros(total, dtype=torch.float64, device=device)
        self.views: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in sizes.items():
            size = math.prod(shape)
            self.views[name] = self.flat[offset : offset + size].view(shape)
            offset += size

    def all_reduce(self, group: dist.ProcessGroup | None) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(self.flat, op=dist.ReduceOp.SUM, group=group)

    def add(self, other: _SumState) -> None:
        if self._shapes != other._shapes:
            raise ValueError("cannot merge accumulators with different bins")
        self.flat += other.flat.to(self.flat.device)


class TokenHistogram:
    """2-D (normalised entropy x target probability) histogram and scalar sums over tokens.

    ``config`` supplies the confident-conflict thresholds and the parameters of each kind's
    weight (alpha, sigmoid, masked thresholds); the mean weight is reported for every kind in
    :data:`megatron_eaft.ops.config.KINDS`, so one pass over a dataset shows how each loss
    would treat it.
    """

    def __init__(
        self,
        config: EAFTConfig,
        entropy_bins: int = 50,
        prob_bins: int = 50,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.entropy_edges = bin_edges(entropy_bins)
        self.prob_edges = bin_edges(prob_bins)
        self._kind_configs = {kind: dataclasses.replace(config, kind=kind) for kind in KINDS}
        self.state = _SumState(
            {
                "joint": (entropy_bins, prob_bins),
                "scalars": (len(_SCALARS),),
                "weights": (len(KINDS),),
            },
            device,
        )

    @property
    def joint(self) -> torch.Tensor:
        return self.state.views["joint"]

    @property
    def entropy_counts(self) -> torch.Tensor:
        """The 1-D histogram of normalised entropy (same bins as the 2-D one)."""
        return self.joint.sum(dim=1)

    @property
    def tokens(self) -> int:
        return int(self.state.views["scalars"][_SCALARS.index("tokens")])

    def update(
        self,
        entropy: torch.Tensor,
        target_prob: torch.Tensor,
        ce: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
    ) -> None:
        """Add tokens: entropy (normalised, in [0, 1]), p(y_t) and CE shaped alike; mask != 0 keeps."""
        keep = _keep_mask(entropy, loss_mask)
        entropy = _masked(entropy, keep).detach().to(torch.float64)
        if torch.isnan(entropy).any():
            raise ValueError(
                "entropy is NaN for loss-masked tokens: compute it (EAFTConfig.diagnostics=True)"
            )
        target_prob = _masked(target_prob, keep).detach().to(torch.float64)
        ce = _masked(ce, keep).detach().to(torch.float64)
        rows = bin_index(entropy, self.entropy_edges)
        cols = bin_index(target_prob, self.prob_edges)
        prob_bins = self.prob_edges.numel() - 1
        flat = torch.bincount(rows * prob_bins + cols, minlength=self.joint.numel())
        self.joint.view(-1).add_(flat.to(self.joint.device, torch.float64))
        conflicts = confident_conflicts(self.config, entropy, target_prob)
        scalars = torch.stack(
            [
                entropy.new_tensor(float(entropy.numel())),
                entropy.sum(),
                target_prob.sum(),
                ce.sum(),
                conflicts.to(torch.float64).sum(),
            ]
        )
        self.state.views["scalars"].add_(scalars.to(self.joint.device))
        weights = torch.stack(
            [token_weight(c, entropy, target_prob).sum() for c in self._kind_configs.values()]
        )
        self.state.views["weights"].add_(weights.to(self.joint.device, torch.float64))

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum over the ranks of ``group`` (the data-parallel group) in place."""
        self.state.all_reduce(group)

    def merge(self, other: TokenHistogram) -> None:
        self.state.add(other.state)

    def to_dict(self) -> dict[str, Any]:
        scalars = dict(zip(_SCALARS, self.state.views["scalars"].tolist(), strict=True))
        tokens = scalars["tokens"]

        def mean(total: float) -> float | None:
            return total / tokens if tokens else None

        weights = self.state.views["weights"].tolist()
        conflict_frac = mean(scalars["conflicts"])
        return {
            "tokens": int(tokens),
            "mean_entropy": mean(scalars["entropy"]),
            "mean_target_prob": mean(scalars["target_prob"]),
            "mean_ce": mean(scalars["ce"]),
            "confident_conflicts": int(scalars["conflicts"]),
            "confident_conflict_frac": conflict_frac,
            "conflict_thresholds": {
                "entropy": self.config.conflict_entropy_threshold,
                "target_prob": self.config.conflict_prob_threshold,
            },
            "mean_weight": {kind: mean(total) for kind, total in zip(KINDS, weights, strict=True)},
            "histogram_2d": {
                "x": "normalised entropy",
                "y": "target probability",
                "entropy_edges": self.entropy_edges.tolist(),
                "prob_edges": self.prob_edges.tolist(),
                "counts": [[int(c) for c in row] for row in self.joint.tolist()],
            },
            "entropy_histogram": {
                "edges": self.entropy_edges.tolist(),
                "counts": [int(c) for c in self.entropy_counts.tolist()],
            },
        }


class EntropyAgreement:
    """Top-K entropy vs exact entropy over tokens: Pearson r and mean |error| per entropy bin.

    Inputs are raw entropies in nats. Bins run over the exact entropy divided by ``normaliser``
    (ln K: the scale EAFT's weight lives on) in [0, 1], plus one overflow bin for tokens whose
    exact entropy exceeds it (where top-K, capped at ln K, must disagree). Errors are in the
    same normalised units, unclipped; ``weight_mean_abs_error`` is the error after clipping
    both to [0, 1], i.e. the difference between the EAFT weights (alpha = 1) of the two modes.
    """

    _SUMS = ("n", "x", "y", "xx", "yy", "xy", "abs_err", "weight_abs_err")

    def __init__(
        self, normaliser: float, bins: int = 20, device: torch.device | str = "cpu"
    ) -> None:
        if not (math.isfinite(normaliser) and normaliser > 0):
            raise ValueError(f"normaliser must be a positive number, got {normaliser!r}")
        self.normaliser = float(normaliser)
        self.edges = bin_edges(bins)
        self.state = _SumState(
            {"sums": (len(self._SUMS),), "bin_counts": (bins + 1,), "bin_abs_err": (bins + 1,)},
            device,
        )

    def update(
        self,
        topk_nats: torch.Tensor,
        exact_nats: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
    ) -> None:
        keep = _keep_mask(topk_nats, loss_mask)
        x = _masked(topk_nats, keep).detach().to(torch.float64)
        y = _masked(exact_nats, keep).detach().to(torch.float64)
        x_norm, y_norm = x / self.normaliser, y / self.normaliser
        error = (x_norm - y_norm).abs()
        weight_error = (x_norm.clamp(0, 1) - y_norm.clamp(0, 1)).abs()
        sums = torch.stack(
            [
                x.new_tensor(float(x.numel())),
                x.sum(),
                y.sum(),
                (x * x).sum(),
                (y * y).sum(),
                (x * y).sum(),
                error.sum(),
                weight_error.sum(),
            ]
        )
        device = self.state.flat.device
        self.state.views["sums"].add_(sums.to(device))
        bins = self.edges.numel() - 1
        index = torch.where(y_norm > 1.0, bins, bin_index(y_norm, self.edges))
        self.state.views["bin_counts"].add_(
            torch.bincount(index, minlength=bins + 1).to(device, torch.float64)
        )
        self.state.views["bin_abs_err"].add_(
            torch.bincount(index, weights=error, minlength=bins + 1).to(device, torch.float64)
        )

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        self.state.all_reduce(group)

    def merge(self, other: EntropyAgreement) -> None:
        self.state.add(other.state)

    def pearson_r(self) -> float | None:
        s = dict(zip(self._SUMS, self.state.views["sums"].tolist(), strict=True))
        n = s["n"]
        cov = n * s["xy"] - s["x"] * s["y"]
        var_x = n * s["xx"] - s["x"] ** 2
        var_y = n * s["yy"] - s["y"] ** 2
        if n < 2 or var_x <= 0 or var_y <= 0:
            return None
        return cov / math.sqrt(var_x * var_y)

    def to_dict(self) -> dict[str, Any]:
        s = dict(zip(self._SUMS, self.state.views["sums"].tolist(), strict=True))
        n = s["n"]
        counts = self.state.views["bin_counts"].tolist()
        errors = self.state.views["bin_abs_err"].tolist()
        per_bin = [e / c if c else None for e, c in zip(errors, counts, strict=True)]
        return {
            "tokens": int(n),
            "normaliser": self.normaliser,
            "pearson_r": self.pearson_r(),
            "mean_abs_error": s["abs_err"] / n if n else None,
            "weight_mean_abs_error": s["weight_abs_err"] / n if n else None,
            "bins": {
                "x": "exact entropy / normaliser",
                "edges": self.edges.tolist(),
                "counts": [int(c) for c in counts[:-1]],
                "mean_abs_error": per_bin[:-1],
            },
            "above_normaliser": {"count": int(counts[-1]), "mean_abs_error": per_bin[-1]},
        }
