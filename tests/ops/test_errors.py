"""Every way the loss refuses bad input, and the degenerate inputs it must survive."""

from __future__ import annotations

import math
import re

import pytest
import torch

from megatron_eaft.megatron.launcher import RankError
from megatron_eaft.ops import EAFTConfig, vocab_parallel_weighted_cross_entropy


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("kind", "focal", "one of sft, dft, eaft, sigmoid, masked"),
        ("entropy", "approx", "one of topk, exact"),
        ("norm", "ln2", "one of lnk, paper, lnv"),
        ("topk", 1, "an integer >= 2"),
        ("topk", 2.5, "an integer >= 2"),
        ("alpha", -0.5, ">= 0"),
        ("alpha", math.nan, ">= 0"),
        ("sigmoid_scale", 0.0, "> 0"),
        ("sigmoid_center", 1.5, "in [0, 1]"),
        ("masked_entropy_threshold", -0.1, "in [0, 1]"),
        ("conflict_prob_threshold", 2.0, "in [0, 1]"),
        ("ignore_index", 5, "a negative integer"),
    ],
)
def test_invalid_config_names_the_field_and_the_allowed_range(field, value, allowed):
    with pytest.raises(ValueError, match=rf"EAFTConfig\.{field}=.*must be {re.escape(allowed)}"):
        EAFTConfig(**{field: value})


def test_lnv_norm_needs_exact_entropy():
    with pytest.raises(ValueError, match=r"EAFTConfig\.norm='lnv'"):
        EAFTConfig(norm="lnv")


def test_unknown_option_from_dict_is_named():
    with pytest.raises(ValueError, match=r"unknown EAFT option.*top_k"):
        EAFTConfig.from_dict({"top_k": 20})


def test_topk_larger_than_the_vocabulary():
    with pytest.raises(ValueError, match=r"EAFTConfig\.topk=20.*<= the vocabulary size 8"):
        vocab_parallel_weighted_cross_entropy(
            torch.randn(2, 1, 8), torch.zeros(2, 1, dtype=torch.long), EAFTConfig()
        )


def test_label_outside_the_vocabulary_is_named_with_its_position():
    labels = torch.tensor([[1, 2], [30, 3]])
    with pytest.raises(ValueError, match=r"label 30 at position \(1, 0\).*\[0, 16\)"):
        vocab_parallel_weighted_cross_entropy(torch.randn(2, 2, 16), labels, EAFTConfig(topk=4))
    labels[1, 0] = -7  # negative but not the ignore index
    with pytest.raises(ValueError, match="label -7"):
        vocab_parallel_weighted_cross_entropy(torch.randn(2, 2, 16), labels, EAFTConfig(topk=4))


def test_out_of_range_label_under_a_loss_mask_is_ignored():
    labels = torch.tensor([[1, 99]])
    out = vocab_parallel_weighted_cross_entropy(
        torch.randn(1, 2, 16), labels, EAFTConfig(topk=4), loss_mask=torch.tensor([[1, 0]])
    )
    assert out.loss[0, 1] == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_raise_when_checked(bad):
    logits = torch.randn(3, 1, 16)
    logits[2, 0, 5] = bad
    labels = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(FloatingPointError, match=r"non-finite logits.*position \(2, 0\)"):
        vocab_parallel_weighted_cross_entropy(
            logits.clone(), labels, EAFTConfig(topk=4, check_finite=True)
        )
    unchecked = vocab_parallel_weighted_cross_entropy(logits.clone(), labels, EAFTConfig(topk=4))
    assert not torch.isfinite(unchecked.loss[2, 0])


def test_mismatched_logits_and_labels():
    with pytest.raises(ValueError, match="disagree on the number of positions"):
        vocab_parallel_weighted_cross_entropy(
            torch.randn(3, 2, 16), torch.zeros(2, 2, dtype=torch.long), EAFTConfig(topk=4)
        )


@pytest.mark.parametrize("how", ["ignore_index", "loss_mask"])
@pytest.mark.parametrize("kind", ["sft", "dft", "eaft", "sigmoid", "masked"])
def test_all_masked_micro_batch_gives_zero_loss_and_zero_grads(kind, how):
    logits = (torch.randn(4, 2, 32) * 10).requires_grad_()
    labels = torch.randint(0, 32, (4, 2))
    mask = None
    if how == "ignore_index":
        labels[:] = -100
    else:
        mask = torch.zeros(4, 2)
    config = EAFTConfig(kind=kind, topk=4, check_finite=True)
    out = vocab_parallel_weighted_cross_entropy(logits * 1.0, labels, config, None, mask)
    out.loss.sum().backward()
    assert torch.all(out.loss == 0) and torch.all(out.weight == 0)
    assert torch.all(logits.grad == 0)


def test_all_masked_through_the_megatron_loss_function():
    from megatron_eaft.megatron.loss import eaft_loss_func

    config = EAFTConfig(topk=4)
    logits = torch.randn(4, 2, 32)
    out = vocab_parallel_weighted_cross_entropy(logits, torch.full((4, 2), -100), config)
    loss = out.loss.transpose(0, 1)
    loss.eaft_stats = type(out)(*(t.transpose(0, 1) for t in out))
    loss_sum, num_tokens, report = eaft_loss_func(torch.zeros(2, 4), loss, config=config)
    assert loss_sum == 0 and num_tokens == 0
    assert all(torch.isfinite(value).all() for value in report.values())


def _bad_label_on_tp2() -> None:
    rank = torch.distributed.get_rank()
    logits = torch.randn(2, 1, 16).chunk(2, dim=-1)[rank].contiguous()
    labels = torch.tensor([[3], [17]])
    vocab_parallel_weighted_cross_entropy(
        logits, labels, EAFTConfig(topk=4), torch.distributed.group.WORLD
    )


def test_bad_label_raises_on_every_tp_rank_without_hanging(dist):
    with pytest.raises(RankError, match=r"label 17 at position \(1, 0\).*\[0, 16\)"):
        dist.run(_bad_label_on_tp2, 2, timeout=60)
