"""Family tables vs. Megatron-Core itself, config validation, and the transforms' layouts."""

from __future__ import annotations

import pytest
import torch

from megatron_eaft.convert.engine import plan_conversion
from megatron_eaft.convert.torch_dist import sharded_object_key
from megatron_eaft.models.families import all_families, family_for_hf_config, get_family
from megatron_eaft.models.family import (
    CONCAT_ROWS,
    INTERLEAVE_QKV,
    PAD_VOCAB,
    Dims,
    UnsupportedConfigError,
)
from tests.convert.tiny_models import CASES, hf_config


def rank_sharded_layout(hf_config_dict: dict, ep: int) -> tuple[dict, list[str]]:
    """Keys and global shapes GPTModel.sharded_state_dict() gives, tensors and objects."""
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.models.build import build_gpt_model

    cpu_runtime.initialize_parallel(ep=ep)
    family = family_for_hf_config(hf_config_dict)
    config = family.transformer_config(
        hf_config_dict, ep=ep, use_cpu_initialization=True, perform_initialization=False
    )
    model = build_gpt_model(hf_config_dict, config)
    tensors: dict[str, tuple[int, ...]] = {}
    objects: list[str] = []
    for entry in model.sharded_state_dict().values():
        built = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
        for item in built if isinstance(built, list) else [built]:
            if isinstance(item, ShardedTensor):
                tensors[item.key] = tuple(item.global_shape)
            elif isinstance(item, ShardedObject):
                objects.append(item.unique_key)
    return tensors, objects


@pytest.mark.parametrize("case", sorted(CASES))
def test_table_matches_gpt_model_sharded_state_dict(dist, case):
    config = hf_config(case).to_dict()
    ep = 2 if CASES[case].expert_parallel else 1
    results = dist.run(rank_sharded_layout, ep, config, ep)
    expected_tensors = {}
    expected_objects: set[str] = set()
    for tensors, objects in results:  # EP ranks hold different experts; the union is the model
        expected_tensors.update(tensors)
        expected_objects.update(objects)
    plan = plan_conversion(family_for_hf_config(config), config)
    assert plan.global_shapes() == expected_tensors
    ours = {sharded_object_key(k, o, s) for k, o, s in plan.extra_state_objects()}
    assert ours == expected_objects


def test_transformer_engine_keys_differ_only_in_the_moe_pre_mlp_norm():
    # Megatron's local spec renames pre_mlp_layernorm to the fused-TE key even in MoE layers;
    # the TE MoE spec keeps a separate pre_mlp_layernorm (gpt_layer_specs.py, 0.19.2).
    for case in CASES:
        config = hf_config(case).to_dict()
        family = family_for_hf_config(config)
        local = plan_conversion(family, config, transformer_impl="local").global_shapes()
        te = plan_conversion(family, config, transformer_impl="transformer_engine").global_shapes()
        if family.name == "qwen3_moe":
            assert set(local) - set(te) == {"decoder.layers.mlp.linear_fc1.layer_norm_weight"}
            assert set(te) - set(local) == {"decoder.layers.pre_mlp_layernorm.weight"}
        else:
            assert local == te


def test_transformer_engine_spec_needs_transformer_engine():
    from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE

    family = get_family("qwen3")
    config = family.transformer_config(hf_config("qwen3_untied").to_dict())
    if HAVE_TE:
        spec = family.layer_spec(config, "transformer_engine")
        assert spec.submodules.self_attention.submodules.linear_qkv.__name__ == (
            "TELayerNormColumnParallelLinear"
        )
    else:
        with pytest.raises(RuntimeError, match="Transformer Engine"):
            family.layer_spec(config, "transformer_engine")
    with pytest.raises(ValueError, match="transformer_impl"):
        family.layer_spec(config, "apex")


def test_every_family_is_registered_once():
    families = all_families()
    assert {"qwen2", "qwen3", "qwen3_moe"} <= set(families)
    assert get_family("qwen3").architectures == ("Qwen3ForCausalLM",)
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        get_family("llama")


def test_transformer_config_carries_the_hf_settings():
    config = hf_config("qwen3_moe").to_dict()
    tc = family_for_hf_config(config).transformer_config(
        config, params_dtype=torch.bfloat16, tp=2, pp=1, ep=2
    )
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (2, 64, 96)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (4, 2, 24)
    assert tc.qk_layernorm and not tc.add_qkv_bias and not tc.add_bias_linear
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit
    assert tc.hidden_dropout == 0.0 and tc.layernorm_epsilon == 1e-6
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 32)
    assert tc.moe_router_pre_softmax is False  # norm_topk_prob=True
    assert tc.bf16 and tc.params_dtype == torch.bfloat16
    assert (tc.tensor_model_parallel_size, tc.expert_model_parallel_size) == (2, 2)
    qwen2 = hf_config("qwen2_tied").to_dict()
    assert family_for_hf_config(qwen2).transformer_config(qwen2).add_qkv_bias


def _with(case: str, **changes) -> dict:
    config = hf_config(case).to_dict()
    config.update(changes)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            _with("qwen2_tied", architectures=["LlamaForCausalLM"]),
            "unsupported architecture 'LlamaForCausalLM'",
        ),
        (_with("qwen2_tied", architectures=None), "no 'architectures'"),
        (_with("qwen2_tied", architectures=["A", "B"]), "several architectures"),
        (
            _with("qwen2_tied", rope_parameters={"rope_type": "yarn", "factor": 4.0}),
            "rope_parameters.rope_type='yarn'",
        ),
        (
            {**_with("qwen2_tied", rope_parameters=None), "rope_scaling": {"type": "dynamic"}},
            "rope_scaling.rope_type='dynamic'",
        ),
        (_with("qwen2_tied", use_sliding_window=True), "use_sliding_window"),
        (
            _with("qwen3_untied", layer_types=["full_attention", "sliding_attention"]),
            "layer_types",
        ),
        (_with("qwen2_tied", hidden_act="gelu"), "hidden_act='gelu'"),
        (_with("qwen3_untied", attention_bias=True), "attention_bias=True"),
        (_with("qwen3_moe", mlp_only_layers=[1]), "mlp_only_layers"),
        (_with("qwen3_moe", decoder_sparse_step=2), "decoder_sparse_step=2"),
        (_with("qwen3_moe", num_experts_per_tok=9), "num_experts_per_tok=9"),
        (_with("qwen2_tied", num_key_value_heads=3), "num_key_value_heads=3"),
        (_with("qwen2_tied", num_hidden_layers=None), "'num_hidden_layers' is missing"),
    ],
)
def test_unsupported_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        family_for_hf_config(config)


def test_unsupported_option_is_its_own_error_type():
    with pytest.raises(UnsupportedConfigError):
        family_for_hf_config(_with("qwen2_tied", use_sliding_window=True))


def test_older_root_level_rope_theta_is_read():
    config = _with("qwen2_tied", rope_parameters=None, rope_theta=12345.0, rope_scaling=None)
    family = family_for_hf_config(config)
    assert family.gpt_model_kwargs(family.hf(config))["rotary_base"] == 12345.0


# -- transforms ------------------------------------------------------------------------------

DIMS = Dims(layers=1, hidden=2, ffn=3, vocab=5, heads=4, groups=2, head_dim=1, padded_vocab=8)


def test_qkv_interleave_puts_each_groups_heads_before_its_key_and_value():
    q = torch.tensor([[10.0, 10], [11, 11], [12, 12], [13, 13]])  # heads 0..3, head_dim 1
    k = torch.tensor([[20.0, 20], [21, 21]])  # groups 0, 1
    v = torch.tensor([[30.0, 30], [31, 31]])
    ((row, fused),) = INTERLEAVE_QKV.to_megatron([q, k, v], DIMS)
    # group 0: q heads 0, 1, k0, v0; group 1: q heads 2, 3, k1, v1
    assert row == 0
    assert fused[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    back = INTERLEAVE_QKV.to_hf(fused, [q.shape, k.shape, v.shape], DIMS)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v], strict=True))
    bias = INTERLEAVE_QKV.to_megatron([q[:, 0], k[:, 0], v[:, 0]], DIMS)[0][1]
    assert bias.tolist() == [10, 11, 20, 30, 12, 13, 21, 31]


def test_concat_rows_hands_pieces_over_without_copying():
    gate, up = torch.zeros(3, 2), torch.ones(3, 2)
    pieces = CONCAT_ROWS.to_megatron([gate, up], DIMS)
    assert [row for row, _ in pieces] == [0, 3]
    assert pieces[0][1] is gate and pieces[1][1] is up
    assert CONCAT_ROWS.megatron_shape([(3, 2), (3, 2)], DIMS) == (6, 2)
    back = CONCAT_ROWS.to_hf(torch.cat([gate, up]), [(3, 2), (3, 2)], DIMS)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


def test_vocab_padding_is_zeros_and_cut_on_export():
    embedding = torch.randn(5, 2)
    pieces = PAD_VOCAB.to_megatron([embedding], DIMS)
    assert [(row, tuple(t.shape)) for row, t in pieces] == [(0, (5, 2)), (5, (3, 2))]
    assert not pieces[1][1].any()
    full = torch.cat([t for _, t in pieces])
    assert torch.equal(PAD_VOCAB.to_hf(full, [(5, 2)], DIMS)[0], embedding)


def test_omitted_head_dim_means_what_it_means_to_transformers():
    # Qwen3MoeConfig has no head_dim (attention is hidden / heads wide); Qwen3Config defaults
    # it to 128. Both are read from transformers' own config classes.
    moe = _with("qwen3_moe")
    del moe["head_dim"]
    family = family_for_hf_config(moe)
    assert family.transformer_config_kwargs(moe)["kv_channels"] == 64 // 4
    q_proj = plan_conversion(family, moe).expected_hf()["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj == (64, 64)
    dense = _with("qwen3_untied")
    del dense["head_dim"]
    assert family_for_hf_config(dense).transformer_config_kwargs(dense)["kv_channels"] == 128
