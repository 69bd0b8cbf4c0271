"""The fused output-layer loss against the unfused one (output matmul, then the vocab-parallel
loss on the logits) at TP = 1, 2, 4: every kind, both entropy modes, fp32 and bf16, chunk sizes
that do not divide the token count, masked and all-masked batches, main_grad accumulation; and
the shard-local top-1 it keeps on request against ``max(dim=-1)`` of the logits.

One pool job per TP size runs every case and returns what the test compares.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_eaft.ops import EAFTConfig, fused_output, vocab_parallel_weighted_cross_entropy
from megatron_eaft.ops.fused_output import (
    LocalTop1,
    chunk_tokens_for_budget,
    fused_output_weighted_cross_entropy,
)
from tests.ops.cases import all_configs

SEQ, BATCH, HIDDEN, VOCAB = 6, 3, 16, 48  # 18 tokens
CHUNKS = (5, 18)  # 5 does not divide 18; 18 is one chunk
MASKS = ("some", "all")
DTYPES = (torch.float32, torch.bfloat16)
FIELDS = ("loss", "ce", "weight", "entropy", "target_prob")


def make_output_case(seed: int, dtype: torch.dtype, mask: str):
    """hidden [s, b, h] (rows of varied scale: peaked and flat distributions), the full output
    weight [V, h], labels [s, b] with an ignored position, a loss mask and an upstream grad."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(SEQ, BATCH, 1, generator=generator) * 3
    hidden = (torch.randn(SEQ, BATCH, HIDDEN, generator=generator) * scale).to(dtype)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).to(dtype)
    labels = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator)
    labels[0, 0] = -100
    loss_mask = (torch.rand(SEQ, BATCH, generator=generator) > 0.25).float()
    if mask == "all":
        loss_mask.zero_()
    grad = torch.rand(SEQ, BATCH, generator=generator) + 0.5
    return hidden, weight, labels, loss_mask, grad


def _unfused(hidden, weight_shard, labels, config, group, loss_mask, grad):
    hidden = hidden.clone().requires_grad_()
    weight_shard = weight_shard.clone().requires_grad_()
    out = vocab_parallel_weighted_cross_entropy(
        hidden @ weight_shard.t(), labels, config, group, loss_mask
    )
    (out.loss * grad).sum().backward()
    return out._replace(loss=out.loss.detach()), hidden.grad, weight_shard.grad


def _fused(hidden, weight_shard, labels, config, group, loss_mask, grad, chunk, main_grad):
    hidden = hidden.clone().requires_grad_()
    weight_shard = weight_shard.clone().requires_grad_()
    accumulator = None
    if main_grad:  # Megatron's gradient-accumulation fusion: add into an fp32 main_grad
        accumulator = torch.full(weight_shard.shape, 0.5)
    out = fused_output_weighted_cross_entropy(
        hidden,
        weight_shard,
        labels,
        config,
        group,
        loss_mask,
        chunk_tokens=chunk,
        main_grad=accumulator,
    )
    (out.loss * grad).sum().backward()
    weight_grad = weight_shard.grad if accumulator is None else accumulator - 0.5
    if accumulator is not None:
        assert weight_shard.grad is None
    return out._replace(loss=out.loss.detach()), hidden.grad, weight_grad


def _run_cases() -> list[dict]:
    group = torch.distributed.group.WORLD
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = []
    configs = all_configs(topk=5)
    for dtype, mask, (index, config) in itertools.product(DTYPES, MASKS, enumerate(configs)):
        hidden, weight, labels, loss_mask, grad = make_output_case(index, dtype, mask)
        shard = weight.chunk(world, dim=0)[rank].contiguous()
        expected = _unfused(hidden, shard, labels, config, group, loss_mask, grad)
        for chunk, main_grad in ((CHUNKS[0], False), (CHUNKS[0], True), (CHUNKS[1], False)):
            got = _fused(hidden, shard, labels, config, group, loss_mask, grad, chunk, main_grad)
            results.append(
                {
                    "label": f"{config.kind}/{config.entropy}/{dtype}/mask={mask}/chunk={chunk}"
                    f"/main_grad={main_grad} TP={world}",
                    "dtype": dtype,
                    "expected": expected,
                    "got": got,
                }
            )
    return results, _top1_cases(group, rank, world)


def _top1_cases(group, rank: int, world: int) -> list[dict]:
    """The shard-local top-1 (for Megatron's MTP acceptance counts) against ``max(dim=-1)`` of
    the unfused logits, and the loss it comes with against the plain fused call."""
    config = all_configs(topk=5)[0]
    cases = []
    for dtype in DTYPES:
        hidden, weight, labels, loss_mask, _ = make_output_case(0, dtype, "some")
        shard = weight.chunk(world, dim=0)[rank].contiguous()
        top1 = LocalTop1.empty(labels.shape, dtype, hidden.device)
        loss = fused_output_weighted_cross_entropy(
            hidden, shard, labels, config, group, loss_mask, chunk_tokens=CHUNKS[0], top1_out=top1
        )
        plain = fused_output_weighted_cross_entropy(
            hidden, shard, labels, config, group, loss_mask, chunk_tokens=CHUNKS[0]
        )
        cases.append(
            {
                "label": f"top1 {dtype} TP={world}",
                "top1": top1,
                "expected": (hidden @ shard.t()).max(dim=-1),
                "same_loss": all(torch.equal(a, b) for a, b in zip(loss, plain, strict=True)),
            }
        )
    return cases


def _assert_matches(case: dict) -> None:
    (expected, expected_hidden, expected_weight) = case["expected"]
    (got, got_hidden, got_weight) = case["got"]
    label = case["label"]
    if case["dtype"] == torch.float32:
        tolerance = {"rtol": 1e-5, "atol": 1e-5}
        grad_tolerance = tolerance
    else:
        # Both paths compute the loss in fp32 from the same bf16 logits (the GEMM rounds
        # them to bf16 either way); the gradients are bf16 in both, and the fused hidden
        # gradient is summed in fp32 over vocabulary blocks before its one rounding (CPU:
        # one bf16 rounding per block first), so they differ by a couple of bf16 ulps
        # (2^-8 relative each). Chunk 5 makes 13-column blocks at TP1: they do not divide V.
        tolerance = {"rtol": 1e-5, "atol": 1e-5}
        grad_tolerance = {"rtol": 2**-6, "atol": 2**-6}
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(got, name),
            getattr(expected, name),
            equal_nan=True,
            msg=f"{name} of {label}",
            **tolerance,
        )
    torch.testing.assert_close(
        got_hidden.float(), expected_hidden.float(), msg=f"grad hidden {label}", **grad_tolerance
    )
    torch.testing.assert_close(
        got_weight.float(), expected_weight.float(), msg=f"grad weight {label}", **grad_tolerance
    )


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_equals_unfused_for_every_case(dist, world):
    per_rank_results = dist.run(_run_cases, world)
    per_rank = [cases for cases, _ in per_rank_results]
    for rank_results in per_rank:
        for case in rank_results:
            _assert_matches(case)
    for _, top1_cases in per_rank_results:
        for case in top1_cases:
            assert case["same_loss"], case["label"]
            assert torch.equal(case["top1"].indices, case["expected"].indices), case["label"]
            assert case["top1"].values.dtype == case["expected"].values.dtype, case["label"]
            torch.testing.assert_close(
                case["top1"].values, case["expected"].values, rtol=1e-5, atol=1e-5
            )
    for case_index, case in enumerate(per_rank[0]):
        for other in per_rank[1:]:
            for name in FIELDS:
                assert torch.equal(
                    getattr(other[case_index]["got"][0], name), getattr(case["got"][0], name)
                ), f"{name} differs across TP ranks for {case['label']}"
    all_masked = [c for c in per_rank[0] if "mask=all" in c["label"]]
    assert all_masked and all(
        torch.all(c["got"][0].loss == 0) and torch.all(c["got"][1] == 0) for c in all_masked
    )


def test_chunk_size_from_the_memory_budget():
    # bf16: logits (2) + fp32 copy (4) + bf16 gradient (2) bytes per vocabulary entry.
    assert chunk_tokens_for_budget(1 << 30, 248320, torch.bfloat16) == (1 << 30) // (248320 * 8)
    assert chunk_tokens_for_budget(1 << 20, 1000, torch.float32) == (1 << 20) // 4000
    assert chunk_tokens_for_budget(10, 1000, torch.float32) == 1


def test_default_chunk_gives_the_same_loss_as_one_chunk():
    hidden, weight, labels, loss_mask, _ = make_output_case(0, torch.float32, "some")
    config = EAFTConfig(topk=5)
    default = fused_output_weighted_cross_entropy(hidden, weight, labels, config, None, loss_mask)
    tiny_budget = fused_output_weighted_cross_entropy(
        hidden, weight, labels, config, None, loss_mask, chunk_memory_bytes=VOCAB * 4 * 4
    )
    torch.testing.assert_close(default.loss, tiny_budget.loss, rtol=1e-5, atol=1e-5)


def test_shape_errors_are_named():
    config = EAFTConfig(topk=5)
    with pytest.raises(ValueError, match="disagree on the hidden size"):
        fused_output_weighted_cross_entropy(
            torch.randn(4, 8), torch.randn(16, 7), torch.zeros(4, dtype=torch.long), config
        )
    with pytest.raises(ValueError, match="disagree on the number of positions"):
        fused_output_weighted_cross_entropy(
            torch.randn(4, 8), torch.randn(16, 8), torch.zeros(5, dtype=torch.long), config
        )
    with pytest.raises(ValueError, match="in the labels' shape"):
        fused_output_weighted_cross_entropy(
            torch.randn(4, 8),
            torch.randn(16, 8),
            torch.zeros(4, dtype=torch.long),
            config,
            top1_out=LocalTop1.empty(torch.Size([5]), torch.float32, torch.device("cpu")),
        )
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        fused_output_weighted_cross_entropy(
            torch.randn(4, 8),
            torch.randn(16, 8),
            torch.zeros(4, dtype=torch.long),
            config,
            chunk_tokens=0,
        )


def test_backward_row_groups_give_the_same_gradients(monkeypatch):
    """On CPU the backward forms each block's bf16 gradient a few rows at a time in an fp32
    scratch; groups of 4 rows (not dividing the 18 tokens) equal one group bit for bit."""
    hidden, weight, labels, loss_mask, grad = make_output_case(3, torch.bfloat16, "some")
    config = EAFTConfig(topk=5)

    def gradients():
        _, hidden_grad, weight_grad = _fused(
            hidden, weight, labels, config, None, loss_mask, grad, CHUNKS[1], False
        )
        return hidden_grad, weight_grad

    one_group = gradients()
    # chunk 18: one block of all 48 columns; fp32 rows of 4 * 48 values per group of 4.
    monkeypatch.setattr(fused_output, "GRAD_SCRATCH_BYTES_CPU", 4 * 4 * VOCAB)
    row_groups = gradients()
    for got, expected in zip(row_groups, one_group, strict=True):
        assert torch.equal(got, expected)
