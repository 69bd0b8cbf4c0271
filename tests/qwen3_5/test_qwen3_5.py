"""Qwen3.5 (Gated DeltaNet + gated attention) through the conversion engine and Megatron-Core.

HF -> torch_dist -> logits at TP1 / TP2 / PP2 against transformers (fp32), for
`Qwen3_5ForCausalLM` and the language model inside `Qwen3_5ForConditionalGeneration`;
HF -> Megatron -> HF bit-exact for both layouts (vision tensors included); the family table
against the GPTModel Megatron builds. The distributed work is batched into two pool jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megatron_eaft.convert import verify
from megatron_eaft.convert.engine import (
    export_megatron_checkpoint,
    import_hf_checkpoint,
    plan_conversion,
)
from megatron_eaft.convert.torch_dist import sharded_object_key
from megatron_eaft.models.families import family_for_hf_config, get_family
from megatron_eaft.models.family import (
    INTERLEAVE_GATED_QKV,
    ZERO_CENTERED_NORM,
    Dims,
    SplitRows,
    UnsupportedConfigError,
)
from tests.qwen3_5 import qwen3_5_models as q35

ATOL = 1e-4
LAYOUTS = ((2, 1), (1, 2))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The causal-LM and the vision-language checkpoints, imported, with reference logits."""
    root = tmp_path_factory.mktemp("qwen3_5")
    input_ids = verify.sample_inputs(q35.VOCAB, batch=2, seq_len=12, seed=5)
    made = {}
    for name, config in (("lm", q35.text_config()), ("vl", q35.vl_config())):
        model = q35.random_model(config, seed=3)
        hf_dir = q35.save(model, root / name / "hf")
        megatron_dir = root / name / "megatron"
        import_hf_checkpoint(hf_dir, megatron_dir, progress=False, fsync=False)
        made[name] = SimpleNamespace(
            hf_dir=hf_dir, megatron_dir=megatron_dir, logits=q35.logits(model, input_ids)
        )
    return input_ids, made


def _layout_and_tp1_logits(megatron_dir: str, input_ids: torch.Tensor):
    from megatron_eaft.models import ModelMetadata
    from tests.convert.test_families import rank_sharded_layout

    layout = rank_sharded_layout(dict(ModelMetadata.read(megatron_dir).hf_config), 1)
    return layout, verify.megatron_logits(megatron_dir, input_ids, 1, 1)


def _logits_at_layouts(runs: list[tuple[str, int, int]], input_ids: torch.Tensor):
    return [verify.megatron_logits(directory, input_ids, tp, pp) for directory, tp, pp in runs]


def test_converted_checkpoints_match_megatron_and_transformers(dist, checkpoints):
    input_ids, made = checkpoints
    lm = made["lm"]

    (tensors, objects), tp1 = dist.run(_layout_and_tp1_logits, 1, str(lm.megatron_dir), input_ids)[
        0
    ]
    config = json.loads((lm.hf_dir / "config.json").read_text())
    plan = plan_conversion(family_for_hf_config(config), config)
    assert plan.indexed_layers
    assert plan.global_shapes() == tensors
    assert {sharded_object_key(*o) for o in plan.extra_state_objects()} == set(objects)

    # Two-rank layouts in one pool job; the VL checkpoint at TP1 is in the verify test below.
    runs = [("lm", tp, pp) for tp, pp in LAYOUTS] + [("vl", 2, 1)]
    layouts = dist.run(
        _logits_at_layouts,
        2,
        [(str(made[name].megatron_dir), tp, pp) for name, tp, pp in runs],
        input_ids,
    )[0]
    assert_logits_match(made, {("lm", 1, 1): tp1, **dict(zip(runs, layouts, strict=True))})


def assert_logits_match(made: dict, results: dict[tuple, torch.Tensor]) -> None:
    """Each (checkpoint name, *layout) run's logits against that checkpoint's reference."""
    for (name, *layout), logits in results.items():
        comparison = verify.compare_logits(made[name].logits, logits)
        assert comparison.max_abs_diff <= ATOL, (name, layout, comparison.line())
        assert comparison.top1_agreement == 1.0, (name, layout, comparison.line())


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def export_bit_exact(source: SimpleNamespace, out: Path) -> dict[str, torch.Tensor]:
    """Export ``source.megatron_dir`` to ``out``; every tensor of ``source.hf_dir`` comes back
    with its name, dtype and bits, and nothing else. Returns the exported tensors."""
    export_megatron_checkpoint(source.megatron_dir, out, progress=False, fsync=False)
    original, exported = _tensors(source.hf_dir), _tensors(out)
    assert sorted(exported) == sorted(original)
    for tensor_name, tensor in original.items():
        assert exported[tensor_name].dtype == tensor.dtype, tensor_name
        assert torch.equal(exported[tensor_name], tensor), tensor_name
    return exported


@pytest.mark.parametrize("name", ["lm", "vl"])
def test_export_is_bit_exact(checkpoints, tmp_path, name):
    _, made = checkpoints
    source = made[name]
    out = tmp_path / "exported"
    exported = export_bit_exact(source, out)
    if name == "vl":
        assert any(n.startswith("model.visual.") for n in exported)
    assert (
        json.loads((out / "config.json").read_text())["architectures"]
        == json.loads((source.hf_dir / "config.json").read_text())["architectures"]
    )


def test_verify_compares_the_vision_language_text_logits_and_refuses_another_model(
    dist, checkpoints, tmp_path
):
    _, made = checkpoints
    vl = made["vl"]
    same = verify.verify_checkpoint(vl.hf_dir, vl.megatron_dir, runner=dist.run)
    assert same.max_abs_diff <= ATOL and same.top1_agreement == 1.0, same.line()
    other = q35.save(q35.random_model(q35.text_config(), seed=4), tmp_path / "other")
    result = verify.verify_checkpoint(other, made["lm"].megatron_dir, runner=dist.run)
    assert not result.ok(verify.DEFAULT_ATOL, verify.DEFAULT_MIN_TOP1), result.line()


# -- the family, pure Python ------------------------------------------------------------------


def test_layer_pattern_follows_full_attention_interval_when_layer_types_is_absent():
    config = q35.text_config(num_hidden_layers=6, full_attention_interval=3).to_dict()
    del config["layer_types"]
    config["full_attention_interval"] = 3
    kwargs = family_for_hf_config(config).transformer_config_kwargs(config)
    assert kwargs["linear_attention_freq"] == [1, 1, 0, 1, 1, 0]
    assert kwargs["layernorm_zero_centered_gamma"] and kwargs["attention_output_gate"]


def test_vision_language_config_reads_the_text_sub_config():
    config = q35.vl_config().to_dict()
    family = get_family("qwen3_5")
    assert family_for_hf_config(config) is family
    plan = plan_conversion(family, config)
    names = plan.expected_hf()
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert not any(n.startswith("model.layers.") for n in names)
    assert plan.layout.is_carried("model.visual.blocks.0.attn.qkv.weight")


def test_unknown_layer_kind_is_named():
    config = q35.text_config().to_dict()
    config["layer_types"] = ["linear_attention", "sliding_attention", "full_attention", "x"]
    with pytest.raises(UnsupportedConfigError, match="layer_types"):
        family_for_hf_config(config)


DIMS = Dims(layers=1, hidden=1, ffn=1, vocab=1, heads=4, groups=2, head_dim=1)


def test_gated_qkv_puts_queries_then_gates_of_each_group_before_its_key_and_value():
    # q_proj rows per head: [q_h; gate_h]; heads 0..3 -> q 10..13, gate 40..43.
    q_proj = torch.tensor([[10.0], [40], [11], [41], [12], [42], [13], [43]])
    k, v = torch.tensor([[20.0], [21]]), torch.tensor([[30.0], [31]])
    ((row, fused),) = INTERLEAVE_GATED_QKV.to_megatron([q_proj, k, v], DIMS)
    assert row == 0
    assert fused[:, 0].tolist() == [10, 11, 40, 41, 20, 30, 12, 13, 42, 43, 21, 31]
    back = INTERLEAVE_GATED_QKV.to_hf(fused, [q_proj.shape, k.shape, v.shape], DIMS)
    assert all(torch.equal(a, b) for a, b in zip(back, [q_proj, k, v], strict=True))


def test_split_rows_makes_one_tensor_per_section_and_joins_them_back():
    dims = Dims(
        layers=1, hidden=1, ffn=1, vocab=1, heads=1, groups=1, head_dim=1, extra={"a": 2, "b": 3}
    )
    split = SplitRows("a", "a", "b")
    tensor = torch.arange(14.0).reshape(7, 2)
    assert split.megatron_shapes([(7, 2)], dims) == ((2, 2), (2, 2), (3, 2))
    pieces = split.to_megatron_outputs([tensor], dims)
    assert [(i, r, tuple(t.shape)) for i, r, t in pieces] == [
        (0, 0, (2, 2)),
        (1, 0, (2, 2)),
        (2, 0, (3, 2)),
    ]
    (joined,) = split.to_hf_from_outputs([t for _, _, t in pieces], [(7, 2)], dims)
    assert torch.equal(joined, tensor)
    with pytest.raises(ValueError, match="do not add up"):
        split.megatron_shapes([(8, 2)], dims)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_offset_round_trips_exactly_from_one_half_up(dtype):
    weights = torch.cat([torch.linspace(0.5, 4.0, 4001), torch.tensor([1.0, 0.5, 2.0])]).to(dtype)
    ((_, stored),) = ZERO_CENTERED_NORM.to_megatron([weights], DIMS)
    assert torch.equal(stored.double(), (weights.double() - 1).to(dtype).double())
    (back,) = ZERO_CENTERED_NORM.to_hf(stored, [weights.shape], DIMS)
    assert torch.equal(back, weights)
    # Below 0.5, w - 1 needs more bits than w has: the round trip is within one ulp.
    small = torch.tensor([0.3, 0.1234567, -0.7], dtype=dtype)
    (back,) = ZERO_CENTERED_NORM.to_hf(
        ZERO_CENTERED_NORM.to_megatron([small], DIMS)[0][1], [(3,)], DIMS
    )
    assert torch.allclose(back, small, atol=float(torch.finfo(dtype).eps), rtol=0)


def test_packed_rows_through_gated_delta_net_are_refused_with_the_reason():
    from megatron_eaft.models.cpu_specs import LocalGatedDeltaNet, fla_available

    if not fla_available():
        with pytest.raises(ValueError, match=r"packed \(THD\) sequences.*fla"):
            LocalGatedDeltaNet.forward(
                object(), None, packed_seq_params=SimpleNamespace(qkv_format="thd")
            )
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)[None, None]
    block_diagonal = causal.clone()
    block_diagonal[..., 2:, :2] = True  # two packed samples of two tokens
    with pytest.raises(ValueError, match="block-diagonal attention mask"):
        LocalGatedDeltaNet.forward(object(), None, block_diagonal)
