"""Dense GLM-4 in Megatron-Core: rotary, sandwich norms, TP/PP logits, checkpoint resharding."""

from __future__ import annotations

import pytest
import torch

from tests.glm4 import glm4_models as glm4

LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def untied_reference():
    config = glm4.tiny_hf_config()
    model = glm4.random_hf_model(config, seed=0)
    tokens = glm4.sample_tokens(config.vocab_size)
    return config, glm4.hf_state_dict(model), tokens, glm4.hf_logits(model, tokens)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------- rotary


def rank_rotary_outputs(head_dim: int, seq: int, rotary_percent: float, theta: float):
    """Megatron's rotary on random q (interleaved and not), and the q it rotated."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel()
    query = torch.randn(seq, 2, 3, head_dim, generator=torch.Generator().manual_seed(5))
    outputs = {}
    for interleaved in (True, False):
        rotary = RotaryEmbedding(
            kv_channels=head_dim,
            rotary_percent=rotary_percent,
            rotary_interleaved=interleaved,
            rotary_base=theta,
            use_cpu_initialization=True,
        )
        outputs[interleaved] = _apply_rotary_pos_emb_bshd(
            query, rotary(seq), rotary_interleaved=interleaved
        )
    return query, outputs


def test_megatron_interleaved_partial_rotary_equals_transformers_glm4(dist):
    from transformers.models.glm4 import modeling_glm4

    config = glm4.tiny_hf_config(head_dim=32, rope_parameters={"rope_theta": 500.0})
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    query, megatron = dist.run(rank_rotary_outputs, 1, 32, 9, 0.5, 500.0)[0]
    # Megatron is [s, b, h, d]; transformers is [b, h, s, d].
    hf_query = query.permute(1, 2, 0, 3)
    positions = torch.arange(query.shape[0]).unsqueeze(0).expand(query.shape[1], -1)
    cos, sin = modeling_glm4.Glm4RotaryEmbedding(config)(hf_query, positions)
    expected, _ = modeling_glm4.apply_rotary_pos_emb(hf_query, hf_query, cos, sin)
    expected = expected.permute(2, 0, 1, 3)

    assert _max_diff(megatron[True], expected) <= 1e-6
    # The dims past the rotary half pass through untouched.
    assert torch.equal(megatron[True][..., 16:], query[..., 16:])
    # Non-interleaved (GLM-4.5 style) rotary is a different function: the check can fail.
    assert _max_diff(megatron[False], expected) > 1e-2


# ---------------------------------------------------------------------------- logits


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2)])
def test_logits_equal_transformers(dist, untied_reference, tp, pp):
    config, hf_state, tokens, expected = untied_reference
    results = dist.run(glm4.rank_logits_from_hf, tp * pp, hf_state, config, tokens, tp, pp)
    assert _max_diff(glm4.last_stage_logits(results), expected) <= LOGIT_TOLERANCE


def test_tied_embeddings_logits_equal_transformers_at_tp2_pp2(dist):
    config = glm4.tiny_hf_config(tie_word_embeddings=True)
    model = glm4.random_hf_model(config, seed=3)
    tokens = glm4.sample_tokens(config.vocab_size, seed=4)
    expected = glm4.hf_logits(model, tokens)
    results = dist.run(glm4.rank_logits_from_hf, 4, glm4.hf_state_dict(model), config, tokens, 2, 2)
    assert _max_diff(glm4.last_stage_logits(results), expected) <= LOGIT_TOLERANCE


def rank_logits_without_sandwich_norms(hf_state, hf_config, tokens):
    """The same weights in upstream's plain layer: what GLM-4 would be without our module."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel()
    model = GPTModel(
        glm4.megatron_config(hf_config),
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_percent=0.5,
        rotary_base=hf_config.rope_parameters["rope_theta"],
    ).eval()
    sandwich = ("post_self_attn_layernorm", "post_mlp_layernorm")
    plain_names = {name for name, _ in model.named_parameters()}
    assert not any(norm in name for name in plain_names for norm in sandwich)
    glm4.load_hf_weights(model, hf_state, hf_config)
    return glm4.forward_logits(model, tokens)


def test_sandwich_norms_are_what_makes_the_logits_match(dist, untied_reference):
    config, hf_state, tokens, expected = untied_reference
    plain = dist.run(rank_logits_without_sandwich_norms, 1, hf_state, config, tokens)[0]
    assert _max_diff(plain, expected) > 1e-2


# ---------------------------------------------------------------------------- checkpoints


def rank_save_checkpoint(hf_state, hf_config, tokens, checkpoint_dir: str, tp: int, pp: int):
    from megatron.core import dist_checkpointing

    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel(tp=tp, pp=pp)
    model = glm4.build_megatron_glm4(hf_config)
    glm4.load_hf_weights(model, hf_state, hf_config)
    sharded = model.sharded_state_dict()
    dist_checkpointing.save(sharded, checkpoint_dir)
    shapes = {t.key: tuple(t.global_shape) for t in sharded.values() if hasattr(t, "global_shape")}
    return glm4.forward_logits(model, tokens), shapes


def rank_load_checkpoint(hf_config, tokens, checkpoint_dir: str, tp: int, pp: int):
    from megatron.core import dist_checkpointing

    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel(tp=tp, pp=pp)
    model = glm4.build_megatron_glm4(hf_config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint_dir))
    return glm4.forward_logits(model, tokens)


def test_checkpoint_saved_at_tp2_reloads_at_tp1_and_pp2(dist, untied_reference, tmp_path):
    config, hf_state, tokens, expected = untied_reference
    checkpoint = tmp_path / "glm4_tp2"
    checkpoint.mkdir()
    checkpoint = str(checkpoint)
    saved = dist.run(rank_save_checkpoint, 2, hf_state, config, tokens, checkpoint, 2, 1)
    saved_logits = glm4.last_stage_logits([logits for logits, _ in saved])
    assert _max_diff(saved_logits, expected) <= LOGIT_TOLERANCE

    # The sandwich norms are checkpointed like input_layernorm: one key, stacked over layers,
    # and the local spec stores its separate norms under Transformer Engine names.
    shapes = saved[0][1]
    layers, hidden = config.num_hidden_layers, config.hidden_size
    for key in (
        "decoder.layers.post_self_attn_layernorm.weight",
        "decoder.layers.post_mlp_layernorm.weight",
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    ):
        assert shapes[key] == (layers, hidden), key

    for tp, pp in ((1, 1), (1, 2)):
        reloaded = dist.run(rank_load_checkpoint, tp * pp, config, tokens, checkpoint, tp, pp)
        assert _max_diff(glm4.last_stage_logits(reloaded), saved_logits) <= 1e-5, (tp, pp)


# ---------------------------------------------------------------------------- spec


def test_transformer_engine_spec_fuses_input_norms_and_keeps_sandwich_norms_separate():
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_eaft.models.glm4_layer import TE_EXTENSION_MODULE, glm4_layer_submodules

    te = glm4_layer_submodules("transformer_engine")
    attention = te.self_attention.submodules
    mlp = te.mlp.keywords["submodules"]
    lazy = {
        "linear_qkv": attention.linear_qkv,
        "core_attention": attention.core_attention,
        "linear_proj": attention.linear_proj,
        "linear_fc1": mlp.linear_fc1,
        "linear_fc2": mlp.linear_fc2,
        "post_self_attn_layernorm": te.post_self_attn_layernorm,
        "post_mlp_layernorm": te.post_mlp_layernorm,
    }
    resolved = {slot: spec.module for slot, spec in lazy.items()}
    assert resolved == {
        "linear_qkv": (TE_EXTENSION_MODULE, "TELayerNormColumnParallelLinear"),
        "core_attention": (TE_EXTENSION_MODULE, "TEDotProductAttention"),
        "linear_proj": (TE_EXTENSION_MODULE, "TERowParallelLinear"),
        "linear_fc1": (TE_EXTENSION_MODULE, "TELayerNormColumnParallelLinear"),
        "linear_fc2": (TE_EXTENSION_MODULE, "TERowParallelLinear"),
        "post_self_attn_layernorm": (TE_EXTENSION_MODULE, "TENorm"),
        "post_mlp_layernorm": (TE_EXTENSION_MODULE, "TENorm"),
    }
    for _, class_name in resolved.values():
        assert hasattr(te_extension, class_name), class_name
    # The input and pre-MLP norms live inside linear_qkv / linear_fc1 as layer_norm_weight.
    assert te.input_layernorm is IdentityOp and te.pre_mlp_layernorm is IdentityOp
    assert te.sharded_state_dict_keys_map == {}

    local = glm4_layer_submodules("local")
    assert local.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }


def test_layer_spec_rejects_what_it_cannot_build():
    from megatron.core.extensions.transformer_engine import HAVE_TE

    from megatron_eaft.models.glm4_layer import glm4_layer_spec

    with pytest.raises(ValueError, match="unknown transformer_impl 'apex'"):
        glm4_layer_spec("apex")  # type: ignore[arg-type]
    if not HAVE_TE:
        with pytest.raises(ImportError, match="Transformer Engine"):
            glm4_layer_spec("transformer_engine")


def test_layer_refuses_megatron_rope_path_that_drops_the_interleave():
    from megatron.core.transformer import TransformerConfig

    from megatron_eaft.models.glm4_layer import Glm4TransformerLayer, glm4_layer_submodules

    config = TransformerConfig(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        rotary_interleaved=True,
        fused_single_qkv_rope=True,
    )
    with pytest.raises(ValueError, match="fused_single_qkv_rope"):
        Glm4TransformerLayer(config, glm4_layer_submodules("local"))
