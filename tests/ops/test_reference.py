"""The oracle against values computed by hand on tiny cases, one per weighting."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_eaft.ops import EAFTConfig, reference_token_loss

# Two positions over a vocabulary of 4. Position 0 is peaked on id 0 and labelled 3 (a confident
# conflict); position 1 is flat and labelled 1.
LOGITS = torch.tensor([[[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
LABELS = torch.tensor([[3, 1]])


def _hand_values(topk: int) -> dict[str, list[float]]:
    z0 = 3 + math.exp(4)
    ce = [math.log(z0) - 0.0, math.log(4)]
    prob = [1 / z0, 0.25]
    # Top-K softmax entropy: position 0 keeps the 4 and (topk - 1) zeros, position 1 is uniform.
    zk = math.exp(4) + (topk - 1)
    q = [math.exp(4) / zk] + [1 / zk] * (topk - 1)
    h0 = -sum(p * math.log(p) for p in q)
    h1 = math.log(topk)
    return {"ce": ce, "prob": prob, "entropy": [h0 / math.log(topk), h1 / math.log(topk)]}


def test_sft_is_plain_cross_entropy():
    out = reference_token_loss(LOGITS, LABELS, EAFTConfig(kind="sft", topk=3))
    hand = _hand_values(3)
    torch.testing.assert_close(out.loss[0], torch.tensor(hand["ce"]))
    torch.testing.assert_close(out.weight[0], torch.ones(2))
    torch.testing.assert_close(out.target_prob[0], torch.tensor(hand["prob"]))


def test_dft_weights_by_target_probability():
    out = reference_token_loss(LOGITS, LABELS, EAFTConfig(kind="dft", topk=3))
    hand = _hand_values(3)
    torch.testing.assert_close(out.weight[0], torch.tensor(hand["prob"]))
    expected = [p * c for p, c in zip(hand["prob"], hand["ce"], strict=True)]
    torch.testing.assert_close(out.loss[0], torch.tensor(expected))


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_eaft_weights_by_normalised_topk_entropy(alpha):
    out = reference_token_loss(LOGITS, LABELS, EAFTConfig(kind="eaft", topk=3, alpha=alpha))
    hand = _hand_values(3)
    weights = [h**alpha for h in hand["entropy"]]
    torch.testing.assert_close(out.entropy[0], torch.tensor(hand["entropy"]))
    torch.testing.assert_close(out.weight[0], torch.tensor(weights))
    expected = [w * c for w, c in zip(weights, hand["ce"], strict=True)]
    torch.testing.assert_close(out.loss[0], torch.tensor(expected))
    assert out.weight[0, 1] == pytest.approx(1.0), "a flat distribution has Htilde = 1"


def test_paper_norm_divides_by_three():
    out = reference_token_loss(LOGITS, LABELS, EAFTConfig(kind="eaft", topk=4, norm="paper"))
    hand = _hand_values(4)
    expected = [h * math.log(4) / 3.0 for h in hand["entropy"]]
    torch.testing.assert_close(out.weight[0], torch.tensor(expected))


def test_exact_entropy_uses_the_whole_vocabulary():
    out = reference_token_loss(LOGITS, LABELS, EAFTConfig(kind="eaft", entropy="exact", norm="lnv"))
    p0 = [math.exp(4) / (3 + math.exp(4))] + [1 / (3 + math.exp(4))] * 3
    h0 = -sum(p * math.log(p) for p in p0)
    torch.testing.assert_close(out.entropy[0], torch.tensor([h0 / math.log(4), 1.0]))


def test_exact_entropy_with_lnk_norm_is_clipped_to_one():
    out = reference_token_loss(LOGITS, LABELS, EAFTConfig(kind="eaft", entropy="exact", topk=2))
    assert out.entropy[0, 1] == 1.0  # ln 4 / ln 2 = 2, clipped


def test_sigmoid_gate():
    config = EAFTConfig(kind="sigmoid", topk=3)
    out = reference_token_loss(LOGITS, LABELS, config)
    hand = _hand_values(3)
    gate = [1 / (1 + math.exp(-30 * (h - 0.17))) for h in hand["entropy"]]
    torch.testing.assert_close(out.weight[0], torch.tensor(gate))


def test_masked_sft_drops_confident_low_probability_tokens():
    hand = _hand_values(3)
    config = EAFTConfig(
        kind="masked", topk=3, masked_entropy_threshold=0.5, masked_prob_threshold=0.1
    )
    assert hand["entropy"][0] < 0.5 and hand["prob"][0] < 0.1
    out = reference_token_loss(LOGITS, LABELS, config)
    torch.testing.assert_close(out.weight[0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out.loss[0], torch.tensor([0.0, hand["ce"][1]]))


def test_ignored_positions_contribute_nothing():
    labels = torch.tensor([[3, -100]])
    logits = LOGITS.clone().requires_grad_()
    out = reference_token_loss(logits, labels, EAFTConfig(kind="eaft", topk=3))
    out.loss.sum().backward()
    assert out.loss[0, 1] == 0 and out.weight[0, 1] == 0 and out.ce[0, 1] == 0
    assert torch.all(logits.grad[0, 1] == 0)
    masked = reference_token_loss(
        LOGITS, LABELS, EAFTConfig(kind="eaft", topk=3), loss_mask=torch.tensor([[1, 0]])
    )
    torch.testing.assert_close(masked.loss, out.loss.detach())
