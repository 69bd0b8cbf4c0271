"""The fused output-layer loss against the unfused one (output matmul, then the vocab-parallel
loss on the logits) at TP = 1, 2, 4: every kind, both entropy modes, fp32 and bf16 (TP4: fp32),
chunk sizes that do not divide the token count, masked and all-masked batches, main_grad
accumulation, the gradients recomputed in backward and formed in the forward pass (with its
recomputing fallback for upstream gradients that differ per token); and the shard-local top-1
it keeps on request against ``max(dim=-1)`` of the logits.

One pool job per TP size runs every case and returns what the test compares.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_eaft.ops import (
    EAFTConfig,
    fused_output,
    vocab_parallel,
    vocab_parallel_weighted_cross_entropy,
)
from megatron_eaft.ops.fused_output import (
    LocalTop1,
    chunk_tokens_for_budget,
    fused_output_weighted_cross_entropy,
)
from tests.ops.cases import CountedRecomputes, all_configs

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


def _fused(
    hidden, weight_shard, labels, config, group, loss_mask, grad, chunk, main_grad, gradient
):
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
        gradient=gradient,
    )
    (out.loss * grad).sum().backward()
    weight_grad = weight_shard.grad if accumulator is None else accumulator - 0.5
    if accumulator is not None:
        assert weight_shard.grad is None
    return out._replace(loss=out.loss.detach()), hidden.grad, weight_grad


# (gradient mode, chunk, main_grad, upstream): "masked" is Megatron's c * loss_mask, one value
# for every weighted token (formed in the forward pass); "random" differs per token (recompute,
# and for "forward" the recomputing fallback of the weight gradient).
FUSED_RUNS = (
    ("recompute", CHUNKS[0], False, "random"),
    ("recompute", CHUNKS[0], True, "random"),
    ("recompute", CHUNKS[1], False, "random"),
    ("forward", CHUNKS[0], False, "masked"),
    ("forward", CHUNKS[0], True, "masked"),
    ("forward", CHUNKS[1], False, "random"),
)


def _run_cases() -> list[dict]:
    group = torch.distributed.group.WORLD
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = []
    configs = all_configs(topk=5)
    # TP4 on fp32 only: what TP changes (shards, collectives) does not depend on the dtype, and
    # bf16's rounding is held to its bound at TP 1 and 2 (the suite's time budget).
    dtypes = DTYPES if world < 4 else (torch.float32,)
    for dtype, mask, (index, config) in itertools.product(dtypes, MASKS, enumerate(configs)):
        hidden, weight, labels, loss_mask, random_grad = make_output_case(index, dtype, mask)
        upstreams = {"random": random_grad, "masked": 0.37 * loss_mask}
        shard = weight.chunk(world, dim=0)[rank].contiguous()
        expected = {
            name: _unfused(hidden, shard, labels, config, group, loss_mask, grad)
            for name, grad in upstreams.items()
        }
        # An all-masked batch has nothing to tell the chunking or the upstream apart: one run
        # per gradient mode.
        runs = FUSED_RUNS if mask == "some" else (FUSED_RUNS[1], FUSED_RUNS[4])
        for gradient, chunk, main_grad, upstream in runs:
            with CountedRecomputes() as recomputes:
                got = _fused(
                    hidden,
                    shard,
                    labels,
                    config,
                    group,
                    loss_mask,
                    upstreams[upstream],
                    chunk,
                    main_grad,
                    gradient,
                )
            results.append(
                {
                    "label": f"{config.kind}/{config.entropy}/{dtype}/mask={mask}/chunk={chunk}"
                    f"/main_grad={main_grad}/gradient={gradient}/upstream={upstream} TP={world}",
                    "dtype": dtype,
                    "expected": expected[upstream],
                    "got": got,
                    "recomputes": recomputes.count,
                    # No weighted token (all masked): nothing to recompute.
                    "recomputes_expected": int(
                        gradient == "recompute" or (upstream == "random" and mask == "some")
                    ),
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
        # Formed in the forward pass, the hidden gradient is rounded after its GEMM and again
        # after the upstream scale, and the CPU's weight gradient once per chunk.
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
            assert case["recomputes"] == case["recomputes_expected"], case["label"]
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
    # Formed in the forward pass, fp32 logits must outlive the softmax pass: a copy of them.
    assert chunk_tokens_for_budget(1 << 20, 1000, torch.float32, "forward") == (1 << 20) // 8000
    assert chunk_tokens_for_budget(1 << 30, 248320, torch.bfloat16, "forward") == (1 << 30) // (
        248320 * 8
    )
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


@pytest.mark.parametrize("gradient", ["recompute", "forward"])
def test_backward_row_groups_give_the_same_gradients(monkeypatch, gradient):
    """On CPU each block's (or forward chunk's) bf16 gradient is formed a few rows at a time in
    an fp32 scratch; groups of 4 rows (not dividing the 18 tokens) equal one group bit for bit."""
    hidden, weight, labels, loss_mask, _ = make_output_case(3, torch.bfloat16, "some")
    config = EAFTConfig(topk=5)

    def gradients():
        _, hidden_grad, weight_grad = _fused(
            hidden, weight, labels, config, None, loss_mask, loss_mask, CHUNKS[1], False, gradient
        )
        return hidden_grad, weight_grad

    one_group = gradients()
    # chunk 18: one block of all 48 columns; fp32 rows of 4 * 48 values per group of 4.
    monkeypatch.setattr(fused_output, "GRAD_SCRATCH_BYTES_CPU", 4 * 4 * VOCAB)
    row_groups = gradients()
    for got, expected in zip(row_groups, one_group, strict=True):
        assert torch.equal(got, expected)


def test_forward_gradient_forms_only_what_autograd_asks_for(monkeypatch):
    """A frozen output weight gets no gradient and needs no shared upstream value (any upstream
    is exact); without autograd (evaluation) nothing is formed at all."""
    hidden, weight, labels, loss_mask, random_grad = make_output_case(4, torch.float32, "some")
    config = EAFTConfig(topk=5)
    formed = []
    original = fused_output._FormedGradients.empty

    def counted(*args):
        formed.append(args[3:5])  # (want_hidden, want_weight)
        return original(*args)

    monkeypatch.setattr(fused_output._FormedGradients, "empty", counted)
    expected = _unfused(hidden, weight, labels, config, None, loss_mask, random_grad)
    frozen = weight.clone()
    local = hidden.clone().requires_grad_()
    with CountedRecomputes() as recomputes:
        out = fused_output_weighted_cross_entropy(
            local, frozen, labels, config, None, loss_mask, chunk_tokens=5, gradient="forward"
        )
        (out.loss * random_grad).sum().backward()
    assert formed == [(True, False)] and recomputes.count == 0
    torch.testing.assert_close(local.grad, expected[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        fused_output_weighted_cross_entropy(
            hidden.requires_grad_(), weight, labels, config, None, loss_mask, gradient="forward"
        )
    assert len(formed) == 1


def test_differing_upstream_without_a_host_read_trips_the_device_assertion(monkeypatch):
    """On an accelerator (no host read unless check_finite) the shared upstream value is
    checked by an asynchronous device assertion; on CPU torch raises it at once."""
    hidden, weight, labels, loss_mask, random_grad = make_output_case(5, torch.float32, "some")
    monkeypatch.setattr(vocab_parallel, "checks_sync", lambda config, device: False)
    with pytest.raises(RuntimeError, match="fused_gradient='recompute'"):
        _fused(
            hidden,
            weight,
            labels,
            EAFTConfig(topk=5),
            None,
            loss_mask,
            random_grad,
            5,
            False,
            "forward",
        )


def test_forward_gradient_keeps_only_the_gradients_until_backward():
    """The chunk's working buffers go with the forward pass (on an accelerator the scratch is
    the chunk's fp32 logits); the formed gradients go with the backward."""
    hidden, weight, labels, loss_mask, _ = make_output_case(6, torch.bfloat16, "some")
    out = fused_output_weighted_cross_entropy(
        hidden.clone().requires_grad_(),
        weight.clone().requires_grad_(),
        labels,
        EAFTConfig(topk=5),
        None,
        loss_mask,
        chunk_tokens=5,
        gradient="forward",
    )
    backward = out.loss.grad_fn.next_functions[0][0]  # under the view: the Function's ctx
    formed = backward.formed
    assert formed.scratch is None and formed.weight_product is None
    assert formed.hidden_grad is not None and formed.weight_grad is not None
    (out.loss * loss_mask).sum().backward()
    assert backward.formed is None


def test_differing_upstream_on_cpu_recomputes_and_says_so_once(caplog):
    hidden, weight, labels, loss_mask, random_grad = make_output_case(7, torch.float32, "some")
    config = EAFTConfig(topk=5)
    expected = _unfused(hidden, weight, labels, config, None, loss_mask, random_grad)
    fused_output._warn_once_recomputing.cache_clear()
    with caplog.at_level("WARNING", logger=fused_output.__name__), CountedRecomputes() as count:
        for _ in range(2):
            got = _fused(
                hidden, weight, labels, config, None, loss_mask, random_grad, 5, False, "forward"
            )
    assert count.count == 2
    assert sum("recomputed in backward" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-5)
