"""HF -> Megatron: the converted checkpoint computes transformers' logits at any layout.

Each case is imported once (tests/convert/conftest.py); every layout loads the same
checkpoint through `dist_checkpointing` with its own TP/PP/EP sharding, so these tests also
cover resharding of the single-process torch_dist output.
"""

from __future__ import annotations

import pytest

from megatron_eaft.convert.verify import compare_logits, megatron_logits
from tests.convert.tiny_models import CASES

ATOL = 1e-4
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1)]
EXPERT_LAYOUTS = [(1, 1, 2), (2, 1, 2)]

PARAMS = [
    pytest.param(case, layout, id=f"{case}-tp{layout[0]}pp{layout[1]}ep{layout[2]}")
    for case, spec in CASES.items()
    for layout in LAYOUTS + (EXPERT_LAYOUTS if spec.expert_parallel else [])
] + [pytest.param("qwen3_untied", (2, 2, 1), id="qwen3_untied-tp2pp2ep1")]


@pytest.mark.parametrize(("case", "layout"), PARAMS)
def test_converted_logits_match_transformers(dist, converted, case, layout):
    tp, pp, ep = layout
    c = converted(case)
    logits = dist.run(megatron_logits, tp * pp * ep, str(c.megatron_dir), c.input_ids, tp, pp, ep)[
        0
    ]
    result = compare_logits(c.hf_logits, logits)
    assert result.max_abs_diff <= ATOL, result.line()
    assert result.top1_agreement == 1.0, result.line()
