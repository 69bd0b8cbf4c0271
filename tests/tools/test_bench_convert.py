"""tools/bench_convert.py's Qwen3.5-27B mode: its tensor table is the one transformers builds
for the real config (both layer kinds), and a shrunk synthetic checkpoint of it converts and
comes back bit-exact where the tool spot-checks. The timed runs (child processes) are not run
here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_eaft.convert.engine import export_megatron_checkpoint, import_hf_checkpoint

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_convert.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_convert", TOOL)
    module = importlib.util.module_from_spec(spec)
    # The tool's dataclasses look their module up while it executes.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _planned_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    from megatron_eaft.convert.engine import plan_conversion
    from megatron_eaft.models.families import family_for_hf_config

    plan = plan_conversion(family_for_hf_config(config), config)
    return {
        name: tuple(shape)
        for unit in plan.units()
        for name, shape in zip(unit.hf_names, unit.hf_shapes, strict=True)
    }


def test_qwen3_5_27b_tensor_table_is_transformers_model(bench):
    import transformers

    config = bench.bench_config(bench.MODELS["qwen3.5-27b"], 4)
    with torch.device("meta"):
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**config))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert _planned_shapes(config) == expected
    # Layers 0-2 Gated DeltaNet, layer 3 gated full attention, at the real widths.
    assert expected["model.layers.0.linear_attn.in_proj_qkv.weight"] == (
        2 * 16 * 128 + 48 * 128,
        5120,
    )
    assert expected["model.layers.3.self_attn.q_proj.weight"] == (2 * 24 * 256, 5120)
    assert expected["model.embed_tokens.weight"] == (248320, 5120)
    assert not any(n.startswith("model.layers.3.linear_attn") for n in expected)


def test_layers_must_hold_both_kinds_and_shrink_must_divide(bench):
    model = bench.MODELS["qwen3.5-27b"]
    with pytest.raises(ValueError, match="--layers >= 4"):
        bench.bench_config(model, 3)
    with pytest.raises(ValueError, match="--shrink 3 does not divide hidden_size"):
        bench.bench_config(model, 4, shrink=3)


def test_shrunk_qwen3_5_checkpoint_converts_and_round_trips(bench, tmp_path):
    model = bench.MODELS["qwen3.5-27b"]
    config = bench.bench_config(model, 4, shrink=64)
    hf_dir = tmp_path / "hf"
    total, largest = bench.synthetic_checkpoint(hf_dir, config, 1 << 20)
    assert len(list(hf_dir.glob("*.safetensors"))) > 1  # sharded as the tool shards
    assert json.loads((hf_dir / "config.json").read_text())["hidden_size"] == 5120 // 64
    summary = import_hf_checkpoint(hf_dir, tmp_path / "mg", progress=False, fsync=False)
    assert summary.bytes == total and largest == 248320 // 64 * 5120 // 64 * 2
    export_megatron_checkpoint(tmp_path / "mg", tmp_path / "out", progress=False, fsync=False)
    bench.spot_check(hf_dir, tmp_path / "out", model.spot_checks)
