"""GLM-4.7-Flash (MLA, sigmoid-routed MoE with expert bias, dense first layer) through the
conversion engine and Megatron-Core.

HF -> torch_dist -> logits at TP1 / EP2 / TP2 / PP2 against transformers (fp32), the family
table against the GPTModel Megatron builds (its MTP layer included), HF -> Megatron -> HF
bit-exact (the MTP layer converted, its copies of the embedding and output layer carried).
The distributed work is two pool jobs (one rank, then two ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

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
from megatron_eaft.models.families import family_for_hf_config
from megatron_eaft.models.family import UnsupportedConfigError
from tests.glm4_moe_lite import glm4_moe_lite_models as glm

ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4_moe_lite")
    input_ids = verify.sample_inputs(glm.VOCAB, batch=2, seq_len=12, seed=5)
    model = glm.random_model(glm.config(), seed=3)
    hf_dir = glm.save(model, root / "hf")
    megatron_dir = root / "megatron"
    import_hf_checkpoint(hf_dir, megatron_dir, progress=False, fsync=False)
    return hf_dir, megatron_dir, input_ids, glm.logits(model, input_ids)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A four-layer model without MTP (dense, MoE | MoE, MoE at PP2): the three-layer one does
    not split into two pipeline stages."""
    root = tmp_path_factory.mktemp("glm4_moe_lite_pp")
    input_ids = verify.sample_inputs(glm.VOCAB, batch=2, seq_len=12, seed=5)
    model = glm.random_model(glm.config(num_hidden_layers=4, num_nextn_predict_layers=0), seed=4)
    model.save_pretrained(root / "hf")
    import_hf_checkpoint(root / "hf", root / "megatron", progress=False, fsync=False)
    return root / "megatron", glm.logits(model, input_ids)


def _layout_and_tp1_logits(megatron_dir: str, input_ids: torch.Tensor):
    from megatron_eaft.models import ModelMetadata
    from tests.convert.test_families import rank_sharded_layout

    layout = rank_sharded_layout(dict(ModelMetadata.read(megatron_dir).hf_config), 1)
    return layout, verify.megatron_logits(megatron_dir, input_ids, 1, 1)


def _logits_at_layouts(runs: list[tuple[str, tuple[int, int, int]]], input_ids: torch.Tensor):
    return [verify.megatron_logits(directory, input_ids, *layout) for directory, layout in runs]


def test_converted_checkpoint_matches_megatron_and_transformers(dist, checkpoint, four_layers):
    hf_dir, megatron_dir, input_ids, reference = checkpoint
    (tensors, objects), tp1 = dist.run(_layout_and_tp1_logits, 1, str(megatron_dir), input_ids)[0]
    config = json.loads((hf_dir / "config.json").read_text())
    plan = plan_conversion(family_for_hf_config(config), config)
    assert plan.indexed_layers
    assert plan.global_shapes() == tensors
    assert {sharded_object_key(*o) for o in plan.extra_state_objects()} == set(objects)

    pipeline_dir, pipeline_reference = four_layers
    runs = [  # (checkpoint, (tp, pp, ep)): EP2, TP2, PP2
        (str(megatron_dir), (1, 1, 2)),
        (str(megatron_dir), (2, 1, 1)),
        (str(pipeline_dir), (1, 2, 1)),
    ]
    two_ranks = dist.run(_logits_at_layouts, 2, runs, input_ids)[0]
    references = [reference, reference, reference, pipeline_reference]
    layouts = [(1, 1, 1), *(layout for _, layout in runs)]
    for layout, expected, logits in zip(layouts, references, [tp1, *two_ranks], strict=True):
        comparison = verify.compare_logits(expected, logits)
        assert comparison.max_abs_diff <= ATOL, (layout, comparison.line())
        assert comparison.top1_agreement == 1.0, (layout, comparison.line())


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_export_is_bit_exact_with_the_mtp_layer(checkpoint, tmp_path):
    hf_dir, megatron_dir, _, _ = checkpoint
    out = tmp_path / "exported"
    export_megatron_checkpoint(megatron_dir, out, progress=False, fsync=False)
    original, exported = _tensors(hf_dir), _tensors(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    assert "model.layers.3.eh_proj.weight" in exported


def test_bf16_checkpoint_keeps_its_fp32_expert_bias_both_ways(tmp_path):
    # A model loaded in bf16 keeps its expert bias in fp32 (_keep_in_fp32_modules_strict) and
    # saves it so; the import takes the weights' dtype for the rest, the export gives both back.
    import transformers

    glm.random_model(glm.config(), seed=1).save_pretrained(tmp_path / "fp32")
    model = transformers.Glm4MoeLiteForCausalLM.from_pretrained(
        tmp_path / "fp32", dtype=torch.bfloat16
    )
    hf_dir = glm.save(model, tmp_path / "hf")
    original = _tensors(hf_dir)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert original[bias].dtype == torch.float32
    assert original["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    import_hf_checkpoint(hf_dir, tmp_path / "megatron", progress=False, fsync=False)
    export_megatron_checkpoint(tmp_path / "megatron", tmp_path / "out", progress=False, fsync=False)
    exported = _tensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


# -- the family, pure Python ------------------------------------------------------------------


def test_config_maps_mla_routing_and_the_dense_first_layer():
    config = glm.config().to_dict()
    kwargs = family_for_hf_config(config).transformer_config_kwargs(config)
    assert kwargs["moe_layer_freq"] == [0, 1, 1]
    assert kwargs["rope_type"] == "rope" and kwargs["rotary_scaling_factor"] == 1.0
    assert kwargs["moe_router_score_function"] == "sigmoid"
    assert kwargs["moe_router_enable_expert_bias"] and kwargs["moe_router_bias_update_rate"] == 0
    assert kwargs["moe_router_topk_scaling_factor"] == 1.8
    assert kwargs["moe_shared_expert_intermediate_size"] == 32
    assert kwargs["layernorm_epsilon"] == 1e-5
    family = family_for_hf_config(config)
    plan = plan_conversion(family, config)
    # One checkpoint for both specs (the latent norms under TE's fused-norm keys).
    te = plan_conversion(family, config, transformer_impl="transformer_engine")
    assert plan.global_shapes() == te.global_shapes()
    assert plan.mtp_layers == 1
    assert "mtp.layers.0.eh_proj.weight" in plan.global_shapes()
    assert plan.layout.is_carried("model.layers.3.shared_head.head.weight")
    assert not plan.layout.is_carried("model.layers.3.eh_proj.weight")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"rope_interleave": False}, "rope_interleave"),
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"n_group": 2, "topk_group": 2}, "topk_group"),
        ({"first_k_dense_replace": 2}, "first_k_dense_replace"),
        ({"q_lora_rank": None}, "q_lora_rank"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope"),
    ],
)
def test_what_megatron_cannot_express_is_refused_by_name(changes, key):
    config = glm.config().to_dict()
    config.update(changes)
    with pytest.raises(UnsupportedConfigError, match=key):
        family_for_hf_config(config)
