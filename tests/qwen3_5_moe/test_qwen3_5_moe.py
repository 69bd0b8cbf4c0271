"""Qwen3.5-MoE through the conversion engine and Megatron-Core.

HF -> torch_dist -> logits at TP1 / EP2 / TP2 / PP2 (eval mode) against transformers (fp32), for
`Qwen3_5MoeForCausalLM` and the language model inside `Qwen3_5MoeForConditionalGeneration`;
the routed experts read per expert (what `save_pretrained` writes) and packed (the published
layout), both into the same Megatron tensors, and exported back bit-exact in the layout they
came from; the family table against the GPTModel Megatron builds. The distributed work is two
pool jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_eaft.convert import verify
from megatron_eaft.convert.engine import (
    import_hf_checkpoint,
    plan_conversion,
)
from megatron_eaft.convert.torch_dist import TorchDistReader, sharded_object_key
from megatron_eaft.models import ModelMetadata
from megatron_eaft.models.checkpoint_dir import checkpoint_dir
from megatron_eaft.models.families import family_for_hf_config, get_family
from megatron_eaft.models.family import (
    CONCAT_ROWS,
    PACKED,
    PER_EXPERT,
    Dims,
    PackedExperts,
    UnsupportedConfigError,
)
from tests.qwen3_5.test_qwen3_5 import _layout_and_tp1_logits, assert_logits_match, export_bit_exact
from tests.qwen3_5_moe import qwen3_5_moe_models as q35m


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per-expert and packed files of one causal LM, a packed VL checkpoint; all imported."""
    root = tmp_path_factory.mktemp("qwen3_5_moe")
    input_ids = verify.sample_inputs(q35m.VOCAB, batch=2, seq_len=12, seed=5)
    lm = q35m.random_model(q35m.text_config(), seed=3)
    vl = q35m.random_model(q35m.vl_config(), seed=3)
    sources = {
        "lm": (q35m.save(lm, root / "lm" / "hf"), lm),
        "lm_packed": (q35m.save_packed(lm, root / "lm_packed" / "hf"), lm),
        "vl_packed": (q35m.save_packed(vl, root / "vl_packed" / "hf"), vl),
    }
    made = {}
    for name, (hf_dir, model) in sources.items():
        megatron_dir = hf_dir.parent / "megatron"
        import_hf_checkpoint(hf_dir, megatron_dir, progress=False, fsync=False)
        made[name] = SimpleNamespace(
            hf_dir=hf_dir, megatron_dir=megatron_dir, logits=q35m.logits(model, input_ids)
        )
    return input_ids, made


def _logits_at_layouts(runs: list[tuple[str, int, int, int]], input_ids: torch.Tensor):
    # megatron_logits runs forward-only in eval mode: MoE at TP2 needs no sequence parallelism.
    return [
        verify.megatron_logits(directory, input_ids, tp, pp, ep) for directory, tp, pp, ep in runs
    ]


def test_converted_checkpoints_match_megatron_and_transformers(dist, checkpoints):
    input_ids, made = checkpoints
    lm = made["lm"]

    (tensors, objects), tp1 = dist.run(_layout_and_tp1_logits, 1, str(lm.megatron_dir), input_ids)[
        0
    ]
    config = json.loads((lm.hf_dir / "config.json").read_text())
    for layout in (PACKED, PER_EXPERT):
        plan = plan_conversion(family_for_hf_config(config), config, variants={"experts": layout})
        assert plan.indexed_layers
        assert plan.global_shapes() == tensors, layout
        assert {sharded_object_key(*o) for o in plan.extra_state_objects()} == set(objects)

    # (name, tp, pp, ep): EP2, TP2, PP2 (two layers with experts on each stage), VL at EP2.
    runs = [("lm", 1, 1, 2), ("lm", 2, 1, 1), ("lm", 1, 2, 1), ("vl_packed", 1, 1, 2)]
    layouts = dist.run(
        _logits_at_layouts,
        2,
        [(str(made[name].megatron_dir), tp, pp, ep) for name, tp, pp, ep in runs],
        input_ids,
    )[0]
    assert_logits_match(made, {("lm", 1, 1, 1): tp1, **dict(zip(runs, layouts, strict=True))})


def _megatron_tensors(megatron_dir: Path) -> dict[str, torch.Tensor]:
    reader = TorchDistReader(checkpoint_dir(megatron_dir))
    return {
        key: reader.read(key, (0,) * len(shape), shape)
        for key, (shape, _) in reader.tensor_keys().items()
    }


def test_both_expert_layouts_import_to_the_same_megatron_tensors(checkpoints):
    _, made = checkpoints
    assert ModelMetadata.read(made["lm"].megatron_dir).hf_variants == {"experts": PER_EXPERT}
    assert ModelMetadata.read(made["lm_packed"].megatron_dir).hf_variants == {"experts": PACKED}
    per_expert = _megatron_tensors(made["lm"].megatron_dir)
    packed = _megatron_tensors(made["lm_packed"].megatron_dir)
    assert sorted(per_expert) == sorted(packed)
    for key, tensor in per_expert.items():
        assert torch.equal(packed[key], tensor), key


@pytest.mark.parametrize("name", ["lm", "lm_packed", "vl_packed"])
def test_export_is_bit_exact_in_the_layout_it_came_from(checkpoints, tmp_path, name):
    _, made = checkpoints
    exported = export_bit_exact(made[name], tmp_path / "exported")
    packed = any(n.endswith("mlp.experts.gate_up_proj") for n in exported)
    assert packed == name.endswith("packed")
    if name == "vl_packed":
        assert any(n.startswith("model.visual.") for n in exported)


def test_qwen3_moe_stacked_layers_read_packed_experts_too(tmp_path):
    """The same rows on a homogeneous decoder ([layer, expert] stacked keys): a packed
    Qwen3-MoE file imports to the per-expert file's tensors and exports back packed."""
    from tests.convert import tiny_models

    model = tiny_models.random_model(tiny_models.hf_config("qwen3_moe"), seed=2)
    made = {}
    for name, save in (("per_expert", tiny_models.save_hf), ("packed", q35m.save_packed)):
        hf_dir = save(model, tmp_path / name / "hf")
        megatron_dir = tmp_path / name / "megatron"
        import_hf_checkpoint(hf_dir, megatron_dir, progress=False, fsync=False)
        assert ModelMetadata.read(megatron_dir).hf_variants == {"experts": name}
        made[name] = SimpleNamespace(hf_dir=hf_dir, megatron_dir=megatron_dir)
    per_expert = _megatron_tensors(made["per_expert"].megatron_dir)
    packed = _megatron_tensors(made["packed"].megatron_dir)
    assert per_expert["decoder.layers.mlp.experts.experts.linear_fc1.weight"].shape == (
        2,
        4,
        64,
        64,
    )
    assert sorted(per_expert) == sorted(packed)
    assert all(torch.equal(packed[k], t) for k, t in per_expert.items())
    exported = export_bit_exact(made["packed"], tmp_path / "exported")
    assert "model.layers.1.mlp.experts.gate_up_proj" in exported


def test_transformers_reads_the_packed_file_as_the_model_it_came_from(checkpoints):
    input_ids, made = checkpoints
    packed = made["lm_packed"]
    assert torch.equal(verify.hf_logits(packed.hf_dir, input_ids), packed.logits)


# -- the family, pure Python ------------------------------------------------------------------


def test_vision_language_config_reads_the_text_sub_config_and_moe_settings():
    config = q35m.vl_config().to_dict()
    family = get_family("qwen3_5_moe")
    assert family_for_hf_config(config) is family
    kwargs = family.transformer_config_kwargs(config)
    assert (kwargs["num_moe_experts"], kwargs["moe_router_topk"]) == (4, 2)
    assert (kwargs["moe_ffn_hidden_size"], kwargs["moe_shared_expert_intermediate_size"]) == (
        32,
        48,
    )
    assert kwargs["moe_shared_expert_gate"] and not kwargs["moe_router_pre_softmax"]
    assert kwargs["linear_attention_freq"] == [1, 0, 1, 0]
    names = plan_conversion(family, config).expected_hf()
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.language_model.layers.3.mlp.shared_expert_gate.weight" in names
    assert not any(n.startswith("model.layers.") for n in names)


@pytest.mark.parametrize(("key", "value"), [("mlp_only_layers", [1]), ("decoder_sparse_step", 2)])
def test_dense_layers_are_refused_since_transformers_builds_none(key, value):
    config = q35m.text_config().to_dict()
    config[key] = value
    with pytest.raises(UnsupportedConfigError, match=f"{key}.*every layer as an MoE layer"):
        family_for_hf_config(config)


def test_a_checkpoint_with_neither_expert_layout_is_reported_in_the_default_one(tmp_path):
    model = q35m.random_model(q35m.text_config(num_hidden_layers=2), seed=1)
    hf_dir = q35m.save_packed(model, tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj"]
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing \(1\):\n    model.layers.1.mlp.experts.down_proj"
    ):
        import_hf_checkpoint(hf_dir, tmp_path / "out", progress=False, fsync=False)
    assert not (tmp_path / "out").exists()


def test_finetune_at_tp2_without_sequence_parallelism_is_refused_before_start_up(checkpoints):
    from megatron_eaft.train.config import ConfigError
    from megatron_eaft.train.preflight import _check_moe_sequence_parallel
    from tests.train import helpers

    _, made = checkpoints
    directory = made["lm"].megatron_dir
    metadata = ModelMetadata.read(directory)
    config = helpers.finetune_config(directory, directory, "parallel.tensor=2")
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel.*MoE layers.*tensor=2"):
        _check_moe_sequence_parallel(config, metadata)
    for allowed in (["parallel.sequence_parallel=true"], ["parallel.tensor=1"]):
        overrides = ["parallel.tensor=2", *allowed]
        _check_moe_sequence_parallel(
            helpers.finetune_config(directory, directory, *overrides), metadata
        )


DIMS = Dims(layers=1, hidden=1, ffn=1, vocab=1, heads=1, groups=1, head_dim=1, experts=3)


def test_packed_experts_with_an_inner_transform_round_trip():
    gate = torch.arange(12.0).reshape(3, 2, 2)
    up = 100 + torch.arange(12.0).reshape(3, 2, 2)
    packed = PackedExperts(CONCAT_ROWS)
    assert packed.megatron_shape([(3, 2, 2), (3, 2, 2)], DIMS) == (3, 4, 2)
    ((row, fused),) = packed.to_megatron([gate, up], DIMS)
    assert row == 0
    assert torch.equal(fused[1], torch.cat([gate[1], up[1]]))
    back = packed.to_hf(fused, [(3, 2, 2), (3, 2, 2)], DIMS)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)
    with pytest.raises(ValueError, match="expert axis"):
        packed.megatron_shape([(2, 2, 2), (2, 2, 2)], DIMS)


def test_unknown_expert_layout_is_named():
    config = q35m.text_config().to_dict()
    with pytest.raises(ValueError, match="unknown HF layout experts='stacked'"):
        plan_conversion(family_for_hf_config(config), config, variants={"experts": "stacked"})
