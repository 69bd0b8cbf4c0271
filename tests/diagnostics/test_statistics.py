"""The accumulators against direct numpy computations, merging, and the DP all-reduce."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_eaft.diagnostics.statistics import (
    EntropyAgreement,
    TokenHistogram,
    bin_edges,
    bin_index,
)
from megatron_eaft.ops import EAFTConfig
from megatron_eaft.ops.config import KINDS

CONFIG = EAFTConfig(alpha=2.0, conflict_entropy_threshold=0.3, conflict_prob_threshold=0.2)
LN_K = math.log(20)


def _tokens(seed: int, count: int = 400) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Squared uniforms crowd the low-entropy / low-probability corner, as real SFT data does;
    # a few exact edge values check the closed last bin.
    entropy = torch.rand(count, generator=generator) ** 2
    target_prob = torch.rand(count, generator=generator) ** 2
    entropy[:3] = torch.tensor([0.0, 1.0, 0.5])
    target_prob[:3] = torch.tensor([1.0, 0.0, 0.02])
    mask = (torch.rand(count, generator=generator) > 0.25).float()
    return {
        "entropy": entropy.view(20, -1),
        "target_prob": target_prob.view(20, -1),
        "ce": -torch.log(target_prob.clamp_min(1e-6)).view(20, -1),
        "mask": mask.view(20, -1),
    }


def _numpy_expectations(tokens: dict[str, torch.Tensor], bins: tuple[int, int]) -> dict:
    keep = tokens["mask"].reshape(-1).numpy() != 0
    entropy = tokens["entropy"].reshape(-1).numpy().astype(np.float64)[keep]
    prob = tokens["target_prob"].reshape(-1).numpy().astype(np.float64)[keep]
    ce = tokens["ce"].reshape(-1).numpy().astype(np.float64)[keep]
    counts, _, _ = np.histogram2d(
        entropy, prob, bins=[np.linspace(0, 1, bins[0] + 1), np.linspace(0, 1, bins[1] + 1)]
    )
    conflicts = (entropy < CONFIG.conflict_entropy_threshold) & (
        prob < CONFIG.conflict_prob_threshold
    )
    weights = {
        "sft": np.ones_like(entropy),
        "dft": prob,
        "eaft": entropy**CONFIG.alpha,
        "sigmoid": 1 / (1 + np.exp(-CONFIG.sigmoid_scale * (entropy - CONFIG.sigmoid_center))),
        "masked": 1.0
        - (
            (entropy < CONFIG.masked_entropy_threshold) & (prob < CONFIG.masked_prob_threshold)
        ).astype(np.float64),
    }
    return {
        "counts": counts,
        "tokens": int(keep.sum()),
        "mean_entropy": entropy.mean(),
        "mean_target_prob": prob.mean(),
        "mean_ce": ce.mean(),
        "conflicts": int(conflicts.sum()),
        "mean_weight": {kind: w.mean() for kind, w in weights.items()},
    }


def _filled(tokens: dict[str, torch.Tensor], bins=(50, 40)) -> TokenHistogram:
    histogram = TokenHistogram(CONFIG, *bins)
    histogram.update(tokens["entropy"], tokens["target_prob"], tokens["ce"], tokens["mask"])
    return histogram


def _assert_matches_numpy(result: dict, expected: dict) -> None:
    np.testing.assert_array_equal(np.asarray(result["histogram_2d"]["counts"]), expected["counts"])
    np.testing.assert_array_equal(
        np.asarray(result["entropy_histogram"]["counts"]), expected["counts"].sum(axis=1)
    )
    assert result["tokens"] == expected["tokens"]
    assert result["confident_conflicts"] == expected["conflicts"]
    assert result["confident_conflict_frac"] == pytest.approx(
        expected["conflicts"] / expected["tokens"]
    )
    for key in ("mean_entropy", "mean_target_prob", "mean_ce"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key
    assert set(result["mean_weight"]) == set(KINDS)
    for kind, value in expected["mean_weight"].items():
        assert result["mean_weight"][kind] == pytest.approx(value, rel=1e-6), kind


def test_histogram_matches_numpy():
    tokens = _tokens(0)
    result = _filled(tokens).to_dict()
    _assert_matches_numpy(result, _numpy_expectations(tokens, (50, 40)))
    assert len(result["histogram_2d"]["counts"]) == 50
    assert len(result["histogram_2d"]["counts"][0]) == 40
    # The edge values: entropy 1.0 lands in the last row, probability 1.0 in the last column.
    assert result["histogram_2d"]["counts"][0][-1] >= 1


def test_bin_index_follows_numpy_edges():
    edges = bin_edges(4)
    values = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.99, 1.0, -0.1, 1.2])
    assert bin_index(values, edges).tolist() == [0, 0, 1, 2, 3, 3, 0, 3]


def test_merge_equals_one_update():
    first, second = _tokens(1), _tokens(2)
    merged = _filled(first)
    merged.merge(_filled(second))
    together = {key: torch.cat([first[key], second[key]]) for key in first}
    _assert_matches_numpy(merged.to_dict(), _numpy_expectations(together, (50, 40)))


def test_fully_masked_batch_adds_nothing():
    tokens = _tokens(3)
    histogram = TokenHistogram(CONFIG)
    histogram.update(tokens["entropy"], tokens["target_prob"], tokens["ce"], 0 * tokens["mask"])
    result = histogram.to_dict()
    assert result["tokens"] == 0
    assert result["mean_entropy"] is None
    assert sum(map(sum, result["histogram_2d"]["counts"])) == 0


def test_errors_are_explicit():
    tokens = _tokens(4)
    histogram = TokenHistogram(CONFIG)
    with pytest.raises(ValueError, match="NaN"):
        histogram.update(
            torch.full_like(tokens["entropy"], math.nan), tokens["target_prob"], tokens["ce"]
        )
    with pytest.raises(ValueError, match="loss_mask has 3 positions"):
        histogram.update(tokens["entropy"], tokens["target_prob"], tokens["ce"], torch.ones(3))
    with pytest.raises(ValueError, match="bins"):
        TokenHistogram(CONFIG, entropy_bins=0)
    with pytest.raises(ValueError, match="normaliser"):
        EntropyAgreement(0.0)
    other = TokenHistogram(CONFIG, 10, 10)
    with pytest.raises(ValueError, match="different bins"):
        histogram.merge(other)


def _entropies(seed: int, count: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    exact = torch.rand(count, generator=generator) * 1.3 * LN_K  # some above ln K
    topk = torch.minimum(exact + 0.05 * torch.randn(count, generator=generator), torch.tensor(LN_K))
    topk = topk.clamp_min(0)
    mask = (torch.rand(count, generator=generator) > 0.2).float()
    return topk, exact, mask


def test_agreement_matches_numpy():
    topk, exact, mask = _entropies(0)
    agreement = EntropyAgreement(LN_K, bins=10)
    agreement.update(topk[:100], exact[:100], mask[:100])
    agreement.update(topk[100:], exact[100:], mask[100:])
    result = agreement.to_dict()

    keep = mask.numpy() != 0
    x = topk.numpy().astype(np.float64)[keep]
    y = exact.numpy().astype(np.float64)[keep]
    assert result["tokens"] == keep.sum()
    assert result["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-9)
    error = np.abs(x - y) / LN_K
    assert result["mean_abs_error"] == pytest.approx(error.mean(), rel=1e-9)
    clipped = np.abs(np.clip(x / LN_K, 0, 1) - np.clip(y / LN_K, 0, 1))
    assert result["weight_mean_abs_error"] == pytest.approx(clipped.mean(), rel=1e-9)
    above = y / LN_K > 1
    assert result["above_normaliser"]["count"] == above.sum()
    assert result["above_normaliser"]["mean_abs_error"] == pytest.approx(error[above].mean())
    edges = np.linspace(0, 1, 11)
    counts, _ = np.histogram(y[~above] / LN_K, bins=edges)
    assert result["bins"]["counts"] == counts.tolist()
    which = np.clip(np.searchsorted(edges, y[~above] / LN_K, side="right") - 1, 0, 9)
    for b in range(10):
        expected = error[~above][which == b]
        got = result["bins"]["mean_abs_error"][b]
        if expected.size:
            assert got == pytest.approx(expected.mean(), rel=1e-9)
        else:
            assert got is None


def test_agreement_of_identical_entropies_is_perfect():
    topk, _, _ = _entropies(1)
    agreement = EntropyAgreement(LN_K, bins=5)
    agreement.update(topk, topk.clone())
    result = agreement.to_dict()
    assert result["pearson_r"] == pytest.approx(1.0)
    assert result["mean_abs_error"] == 0.0
    constant = EntropyAgreement(LN_K)
    constant.update(torch.ones(4), torch.ones(4))
    assert constant.pearson_r() is None  # no variance: undefined, not NaN


def _dp_rank_statistics(seed: int) -> dict:
    """Rank function: each DP rank fills its own shard, then all-reduce over the world."""
    rank = torch.distributed.get_rank()
    tokens = _tokens(seed + rank)
    topk, exact, mask = _entropies(seed + rank)
    histogram = _filled(tokens)
    agreement = EntropyAgreement(LN_K, bins=10)
    agreement.update(topk, exact, mask)
    histogram.all_reduce(torch.distributed.group.WORLD)
    agreement.all_reduce(torch.distributed.group.WORLD)
    return {"histogram": histogram.to_dict(), "agreement": agreement.to_dict()}


def test_all_reduce_over_two_data_parallel_ranks(dist):
    results = dist.run(_dp_rank_statistics, 2, 10)
    assert results[0] == results[1]
    shards = [_tokens(10), _tokens(11)]
    together = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
    _assert_matches_numpy(results[0]["histogram"], _numpy_expectations(together, (50, 40)))

    single = EntropyAgreement(LN_K, bins=10)
    for seed in (10, 11):
        single.update(*_entropies(seed))
    expected = single.to_dict()
    got = results[0]["agreement"]
    assert got["bins"]["counts"] == expected["bins"]["counts"]
    assert got["pearson_r"] == pytest.approx(expected["pearson_r"], rel=1e-12)
