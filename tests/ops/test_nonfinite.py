"""Non-finite logits mean the same at every TP size, in both entropy modes, fused or not.

-inf is a legal masked-out logit (probability 0): loss, entropy, weights and gradients stay
finite and equal the oracle's. NaN and +inf are errors that check_finite reports on every TP
rank, also when they sit in a non-zero rank's shard (gloo's MAX all-reduce drops NaN, so the
flag has to be reduced separately). A row with no finite logit at all is an error as well.

One pool job per TP size runs every case; errors are caught on the ranks and returned.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_eaft.ops import (
    EAFTConfig,
    fused_output_weighted_cross_entropy,
    reference_token_loss,
    vocab_parallel_weighted_cross_entropy,
)

SEQ, BATCH, VOCAB, HIDDEN = 4, 2, 32, 8
KINDS = ("sft", "dft", "eaft", "masked")
ENTROPY_MODES = ("topk", "exact")
FIELDS = ("loss", "ce", "weight", "entropy", "target_prob")


def _config(kind: str, entropy: str, check_finite: bool = True) -> EAFTConfig:
    return EAFTConfig(kind=kind, entropy=entropy, topk=6, check_finite=check_finite)


def masked_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [s, b, V] with -inf in non-label places: one id in each TP2 half, a row with
    fewer than K finite logits, and a whole padded-vocabulary column."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=generator) * 3
    labels = torch.tensor([[1, 2], [3, 20], [5, 6], [7, 8]])
    logits[0, 0, 4] = -math.inf  # rank 0's half at TP2
    logits[1, 1, 30] = -math.inf  # rank 1's half
    logits[2, 0, :] = -math.inf  # only 3 finite logits (K = 6) ...
    logits[2, 0, [5, 9, 25]] = torch.tensor([1.0, 2.0, 0.5])  # ... the label's among them
    logits[..., VOCAB - 1] = -math.inf  # a padded id, masked out everywhere
    return logits, labels


def _shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return full.chunk(world, dim=-1)[rank].contiguous()


def _unfused_with_masked_logits() -> list[dict]:
    group = torch.distributed.group.WORLD
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logits, labels = masked_logits()
    results = []
    for kind, entropy in itertools.product(KINDS, ENTROPY_MODES):
        shard = _shard(logits, rank, world).requires_grad_()
        out = vocab_parallel_weighted_cross_entropy(
            shard * 1.0, labels, _config(kind, entropy), group
        )
        out.loss.sum().backward()
        out = out._replace(loss=out.loss.detach())
        results.append({"kind": kind, "entropy": entropy, "out": out, "grad": shard.grad})
    return results


@pytest.mark.parametrize("world", [1, 2])
def test_minus_inf_is_a_masked_out_logit(dist, world):
    logits, labels = masked_logits()
    for rank, results in enumerate(dist.run(_unfused_with_masked_logits, world)):
        for result in results:
            config = _config(result["kind"], result["entropy"])
            label = f"{config.kind}/{config.entropy} TP={world} rank {rank}"
            full = logits.clone().requires_grad_()
            expected = reference_token_loss(full, labels, config)
            expected.loss.sum().backward()
            out = result["out"]
            for name in FIELDS:
                value = getattr(out, name)
                assert torch.isfinite(value).all() or name == "entropy", f"{name} {label}"
                torch.testing.assert_close(
                    value.detach(),
                    getattr(expected, name).detach(),
                    rtol=1e-5,
                    atol=1e-6,
                    equal_nan=True,
                    msg=f"{name} {label}",
                )
            assert torch.isfinite(result["grad"]).all(), label
            torch.testing.assert_close(
                result["grad"], _shard(full.grad, rank, world), rtol=1e-5, atol=1e-6, msg=label
            )
            if config.needs_entropy:
                assert torch.isfinite(out.entropy).all(), label


def _poisoned_output_case(poison: str, world: int):
    """hidden [T, h] and weight [V, h]; poison the logits of vocabulary id 30 (in the last
    TP rank's shard) through the weight, or make one row's logits all -inf."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(SEQ * BATCH, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    labels = torch.randint(0, 8, (SEQ * BATCH,), generator=generator)
    hidden[:, 0] = 1.0  # so that weight[v, 0] = -inf makes logit v -inf on every row
    if poison == "nan":
        weight[30, 3] = math.nan
    elif poison == "+inf":
        weight[30, 0] = math.inf
    elif poison == "-inf":
        weight[30, 0] = -math.inf
    return hidden, weight, labels


def _checked_everywhere() -> list[dict]:
    """Each poison x path (unfused, or fused with its gradient mode) x entropy mode under
    check_finite: the error (or None) per case."""
    group = torch.distributed.group.WORLD
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = []
    for poison, fused, entropy in itertools.product(
        ("nan", "+inf", "-inf", "all -inf row"), (None, "recompute", "forward"), ENTROPY_MODES
    ):
        if fused and poison == "all -inf row":
            continue  # only the hidden states could make a fused row -inf (then also +inf)
        config = _config("eaft", entropy)
        hidden, weight, labels = _poisoned_output_case(poison, world)
        shard = weight.chunk(world, dim=0)[rank].contiguous().requires_grad_()
        error, out = None, None
        try:
            if fused:
                out = fused_output_weighted_cross_entropy(
                    hidden, shard, labels, config, group, chunk_tokens=3, gradient=fused
                )
            else:
                logits = hidden @ shard.t()
                if poison == "all -inf row":
                    logits = logits.detach().clone()
                    logits[5] = -math.inf
                out = vocab_parallel_weighted_cross_entropy(logits, labels, config, group)
            out.loss.sum().backward()
        except FloatingPointError as caught:
            error = str(caught)
        results.append(
            {
                "case": (poison, fused, entropy),
                "error": error,
                "loss": None if out is None else out.loss.detach(),
                "weight_grad": shard.grad,
            }
        )
    return results


@pytest.mark.parametrize("world", [1, 2])
def test_nan_and_plus_inf_raise_on_every_rank_and_minus_inf_does_not(dist, world):
    for rank, results in enumerate(dist.run(_checked_everywhere, world)):
        for result in results:
            poison = result["case"][0]
            label = f"{result['case']} TP={world} rank {rank}"
            if poison in ("nan", "+inf"):
                assert result["error"] is not None, f"not flagged: {label}"
                assert (
                    "non-finite logits" in result["error"] and "position (0,)" in (result["error"])
                ), label
            elif poison == "all -inf row":
                assert "position (5,)" in (result["error"] or ""), label
            else:  # -inf: a masked-out id; the forward and the weight gradient stay finite
                assert result["error"] is None, label
                assert torch.isfinite(result["loss"]).all(), label
                assert torch.isfinite(result["weight_grad"]).all(), label


def test_fused_minus_inf_id_gives_the_unfused_loss():
    hidden, weight, labels = _poisoned_output_case("-inf", 1)
    for entropy in ENTROPY_MODES:
        config = _config("eaft", entropy)
        fused = fused_output_weighted_cross_entropy(hidden, weight, labels, config, chunk_tokens=3)
        unfused = vocab_parallel_weighted_cross_entropy(hidden @ weight.t(), labels, config)
        for name in FIELDS:
            torch.testing.assert_close(
                getattr(fused, name),
                getattr(unfused, name),
                rtol=1e-5,
                atol=1e-6,
                msg=f"{name} {entropy}",
            )


@pytest.mark.parametrize("entropy", ENTROPY_MODES)
def test_unchecked_minus_inf_in_exact_mode_keeps_the_batch_loss_finite(entropy):
    """The case found by hand: one -inf logit (not the label) made the exact-entropy weight NaN
    and, through 0 x NaN, the whole batch loss NaN."""
    logits = torch.randn(3, 1, 16)
    logits[1, 0, 7] = -math.inf
    labels = torch.zeros(3, 1, dtype=torch.long)
    out = vocab_parallel_weighted_cross_entropy(
        logits, labels, _config("eaft", entropy, check_finite=False)
    )
    assert torch.isfinite(out.weight).all() and torch.isfinite(out.loss.sum())
