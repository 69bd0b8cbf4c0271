"""The fused vocab-parallel loss against the single-device oracle at TP = 1, 2, 4."""

from __future__ import annotations

import pytest
import torch

from megatron_eaft.ops import (
    EAFTConfig,
    reference_token_loss,
    vocab_parallel_weighted_cross_entropy,
)
from tests.ops.cases import all_configs, make_case

SEQ, BATCH, VOCAB = 6, 3, 48
DTYPES = (torch.float32, torch.bfloat16)


def _shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return full.chunk(world, dim=-1)[rank].contiguous()


def _run_all_cases(vocab: int, topk: int) -> list[dict]:
    """On every rank: each config x dtype on the rank's vocabulary shard."""
    group = torch.distributed.group.WORLD
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = []
    for dtype in DTYPES:
        for index, config in enumerate(all_configs(topk)):
            logits, labels, loss_mask, grad = make_case(index, SEQ, BATCH, vocab, dtype)
            shard = _shard(logits, rank, world).requires_grad_()
            out = vocab_parallel_weighted_cross_entropy(
                shard.clone() if dtype == torch.float32 else shard, labels, config, group, loss_mask
            )
            (out.loss * grad).sum().backward()
            results.append(
                {
                    "config": config,
                    "dtype": dtype,
                    "out": out._replace(loss=out.loss.detach()),
                    "grad": shard.grad,
                }
            )
    return results


def _expected(config: EAFTConfig, dtype: torch.dtype, index: int, vocab: int):
    logits, labels, loss_mask, grad = make_case(index, SEQ, BATCH, vocab, dtype)
    full = logits.float().requires_grad_()
    out = reference_token_loss(full, labels, config, loss_mask)
    (out.loss * grad).sum().backward()
    return out, full.grad


@pytest.mark.parametrize(
    ("world", "vocab", "topk"), [(1, VOCAB, 5), (2, VOCAB, 5), (4, VOCAB, 5), (4, 16, 10)]
)
def test_matches_reference_for_every_kind_dtype_and_layout(dist, world, vocab, topk):
    """(4, 16, 10): each shard holds 4 ids, fewer than K = 10."""
    per_rank = dist.run(_run_all_cases, world, vocab, topk)
    n_configs = len(all_configs(topk))
    for case_index, first in enumerate(per_rank[0]):
        config, dtype = first["config"], first["dtype"]
        expected, expected_grad = _expected(config, dtype, case_index % n_configs, vocab)
        label = f"{config.kind}/{config.entropy}/{dtype} TP={world}"
        for rank_results in per_rank[1:]:
            other = rank_results[case_index]["out"]
            for name in ("loss", "ce", "weight", "entropy", "target_prob"):
                assert torch.equal(getattr(other, name), getattr(first["out"], name)), (
                    f"{name} differs across TP ranks for {label}"
                )
        got = first["out"]
        torch.testing.assert_close(
            got.loss, expected.loss.detach(), rtol=1e-5, atol=1e-6, msg=label
        )
        torch.testing.assert_close(got.weight, expected.weight, rtol=1e-5, atol=1e-6, msg=label)
        torch.testing.assert_close(got.ce, expected.ce, rtol=1e-5, atol=1e-6, msg=label)
        torch.testing.assert_close(
            got.entropy, expected.entropy, rtol=1e-5, atol=1e-6, equal_nan=True, msg=label
        )
        grad = torch.cat([r[case_index]["grad"].float() for r in per_rank], dim=-1)
        if dtype == torch.float32:
            torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6, msg=label)
        else:
            # The loss is computed in fp32 from the same bf16 values; only the returned
            # gradient is rounded to bf16 (8 mantissa bits: relative error <= 2^-8).
            torch.testing.assert_close(grad, expected_grad, rtol=2**-7, atol=1e-5, msg=label)


def _collective_profile(config: EAFTConfig) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    original_reduce, original_gather = torch.distributed.all_reduce, torch.distributed.all_gather

    def all_reduce(tensor, *args, **kwargs):
        calls.append(("all_reduce", tensor.numel()))
        return original_reduce(tensor, *args, **kwargs)

    def all_gather(tensors, tensor, *args, **kwargs):
        calls.append(("all_gather", tensor.numel()))
        return original_gather(tensors, tensor, *args, **kwargs)

    torch.distributed.all_reduce, torch.distributed.all_gather = all_reduce, all_gather
    try:
        logits, labels, _, _ = make_case(0, SEQ, BATCH, VOCAB, torch.float32)
        shard = _shard(logits, torch.distributed.get_rank(), 2)
        vocab_parallel_weighted_cross_entropy(shard, labels, config, torch.distributed.group.WORLD)
    finally:
        torch.distributed.all_reduce, torch.distributed.all_gather = (
            original_reduce,
            original_gather,
        )
    return calls


def test_communication_per_call(dist):
    """Plain CE: max + one fused sum; exact entropy adds one float per token to that sum;
    top-K adds one all-gather of K values per token."""
    tokens = SEQ * BATCH
    sft = dist.run(_collective_profile, 2, EAFTConfig(kind="sft", diagnostics=False))[0]
    exact = dist.run(_collective_profile, 2, EAFTConfig(kind="eaft", entropy="exact"))[0]
    topk = dist.run(_collective_profile, 2, EAFTConfig(kind="eaft", topk=5))[0]
    assert sft == [("all_reduce", tokens), ("all_reduce", 2 * tokens)]
    assert exact == [("all_reduce", tokens), ("all_reduce", 3 * tokens)]
    assert topk == [("all_gather", 5 * tokens), ("all_reduce", tokens), ("all_reduce", 2 * tokens)]


def _standalone_entropy(config: EAFTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron_eaft.ops.vocab_parallel import normalised_entropy

    group = torch.distributed.group.WORLD
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logits, labels, _, _ = make_case(7, SEQ, BATCH, VOCAB, torch.bfloat16)
    shard = _shard(logits, rank, world)
    standalone = normalised_entropy(shard, config, group)
    assert torch.equal(shard, _shard(logits, rank, world)), "logits must be left untouched"
    return standalone, vocab_parallel_weighted_cross_entropy(shard, labels, config, group).entropy


@pytest.mark.parametrize("entropy", ["topk", "exact"])
def test_standalone_entropy_equals_the_fused_one(dist, entropy):
    config = EAFTConfig(entropy=entropy, topk=5)
    for standalone, fused in dist.run(_standalone_entropy, 2, config):
        torch.testing.assert_close(standalone, fused, rtol=1e-5, atol=1e-6)
