"""The blocked top-K prefilter (local_topk_values, added for tools/bench_loss.py's findings)
returns exactly torch.topk's values: ties, -inf padding, leftover columns, strided rows."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_eaft.ops.vocab_parallel import local_topk_values


def _sorted_values(values: torch.Tensor) -> torch.Tensor:
    return values.sort(dim=-1, descending=True).values


@st.composite
def rows_and_k(draw):
    rows = draw(st.integers(1, 5))
    width = draw(st.integers(2, 400))
    k = draw(st.integers(2, min(width, 40)))
    dtype = draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # Few distinct values force ties across blocks; a wide range exercises the usual case.
    levels = draw(st.sampled_from((3, 50, None)))
    if levels is None:
        logits = torch.randn(rows, width, generator=generator) * 5
    else:
        logits = torch.randint(0, levels, (rows, width), generator=generator).float()
    padded = torch.rand(rows, width, generator=generator) < draw(st.floats(0.0, 0.3))
    logits[padded] = float("-inf")
    return logits.to(dtype), k


@settings(max_examples=300, deadline=None)
@given(rows_and_k())
def test_prefilter_values_equal_torch_topk(case):
    logits, k = case
    expected = torch.topk(logits, k, dim=-1).values
    assert torch.equal(_sorted_values(local_topk_values(logits, k)), _sorted_values(expected))


def test_prefilter_on_a_realistic_shard_and_a_strided_view():
    generator = torch.Generator().manual_seed(0)
    shard = (torch.randn(8, 75968 + 7, generator=generator) * 3).to(torch.bfloat16)
    for logits in (shard, shard[:, 7:], shard[::2]):  # leftover columns, offset rows, strided
        expected = torch.topk(logits, 20, dim=-1).values
        got = local_topk_values(logits, 20)
        assert got.dtype == logits.dtype
        assert torch.equal(_sorted_values(got), _sorted_values(expected))
    transposed = shard[:, :64].t()  # last-dim stride != 1: plain torch.topk
    assert torch.equal(
        _sorted_values(local_topk_values(transposed, 5)),
        _sorted_values(torch.topk(transposed, 5, dim=-1).values),
    )
