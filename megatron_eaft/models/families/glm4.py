"""Dense GLM-4 / GLM-4-0414 (`Glm4ForCausalLM`): Qwen2's attention plus "sandwich" norms.

Differences from Qwen2 that matter for identical logits:
  * `post_self_attn_layernorm` / `post_mlp_layernorm` on the attention / MLP outputs before
    each residual add: not a Megatron-Core option, so the family brings its own layer
    (`megatron_eaft.models.glm4_layer`);
  * RoPE on the first `partial_rotary_factor` (0.5) of each head, rotating interleaved pairs
    (0::2, 1::2): `rotary_interleaved=True`, `rotary_percent=0.5`;
  * the MLP's gate and up projections are one HF tensor, `gate_up_proj` = [gate; up], which
    is already Megatron's fc1 layout;
  * transformers' defaults where config.json is silent: head_dim 128, rms_norm_eps
    1.5625e-07, qkv bias on, partial_rotary_factor 0.5.
GLM-4.5 / 4.6 (`Glm4MoeForCausalLM`) are a different architecture (MoE, non-interleaved RoPE).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from megatron_eaft.models.families.qwen2 import (
    ATTENTION,
    EMBEDDINGS,
    QKV_BIAS,
    L,
    lm_head_beside_tied_embeddings,
)
from megatron_eaft.models.family import (
    HFConfig,
    ModelFamily,
    Param,
    llama_like_dims,
    rope_gpt_model_kwargs,
    swiglu_rmsnorm_decoder_config,
)

# transformers' Glm4Config defaults, used where a config.json omits the key.
GLM4_DEFAULT_HEAD_DIM = 128
GLM4_DEFAULT_RMS_NORM_EPS = 1.5625e-07
GLM4_DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5
GLM4_DEFAULT_ATTENTION_BIAS = True
GLM4_DEFAULT_MAX_POSITIONS = 131072


def glm4_dims(hf: HFConfig):
    with_head_dim = {**hf.to_dict(), "head_dim": hf.get("head_dim") or GLM4_DEFAULT_HEAD_DIM}
    return llama_like_dims(HFConfig(with_head_dim, hf.source))


def attention_bias(hf: HFConfig) -> bool:
    return bool(hf.get("attention_bias", GLM4_DEFAULT_ATTENTION_BIAS))


def partial_rotary_factor(hf: HFConfig) -> float:
    """Rotated fraction of each head: under rope_parameters (transformers 5) or at the root."""
    factor = hf.rope_parameters.get("partial_rotary_factor")
    if factor is None:
        factor = hf.get("partial_rotary_factor", GLM4_DEFAULT_PARTIAL_ROTARY_FACTOR)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
        raise hf.unsupported("partial_rotary_factor", factor, "must be a number in (0, 1]")
    return float(factor)


def glm4_config(hf: HFConfig) -> dict[str, Any]:
    partial_rotary_factor(hf)  # validated here so a bad value fails before any tensor moves
    return {
        **swiglu_rmsnorm_decoder_config(hf, glm4_dims(hf)),
        "layernorm_epsilon": float(hf.get("rms_norm_eps", GLM4_DEFAULT_RMS_NORM_EPS)),
        # GLM-4's attention_bias covers q/k/v only (o_proj has none): Megatron's add_qkv_bias.
        "add_qkv_bias": attention_bias(hf),
        "rotary_interleaved": True,
    }


def glm4_gpt_model_kwargs(hf: HFConfig) -> dict[str, Any]:
    return {
        **rope_gpt_model_kwargs(hf),
        "rotary_percent": partial_rotary_factor(hf),
        "max_sequence_length": hf.integer("max_position_embeddings", GLM4_DEFAULT_MAX_POSITIONS),
    }


def glm4_layer_spec(config: Any, transformer_impl: str) -> Any:
    from megatron_eaft.models.glm4_layer import glm4_layer_spec as layer_spec

    return layer_spec(transformer_impl)  # type: ignore[arg-type]


SANDWICH_MLP = (
    Param(
        "decoder.layers.post_self_attn_layernorm.weight",
        L + "post_self_attn_layernorm.weight",
        ("hidden",),
    ),
    Param(
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        L + "post_attention_layernorm.weight",
        ("hidden",),
    ),
    Param(
        "decoder.layers.mlp.linear_fc1.weight", L + "mlp.gate_up_proj.weight", ("2*ffn", "hidden")
    ),
    Param("decoder.layers.mlp.linear_fc2.weight", L + "mlp.down_proj.weight", ("hidden", "ffn")),
    Param("decoder.layers.post_mlp_layernorm.weight", L + "post_mlp_layernorm.weight", ("hidden",)),
)

FAMILY = ModelFamily(
    name="glm4",
    architectures=("Glm4ForCausalLM",),
    config=glm4_config,
    dims=glm4_dims,
    params=(*EMBEDDINGS, *ATTENTION, replace(QKV_BIAS, when=attention_bias), *SANDWICH_MLP),
    gpt_model_kwargs=glm4_gpt_model_kwargs,
    layer_spec_fn=glm4_layer_spec,
    ignored_hf=lm_head_beside_tied_embeddings,
)
