"""Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): RMSNorm, SwiGLU, GQA with q/k/v biases, RoPE."""

from __future__ import annotations

from typing import Any

from megatron_eaft.models.family import (
    CONCAT_ROWS,
    INTERLEAVE_QKV,
    PAD_VOCAB,
    HFConfig,
    ModelFamily,
    Param,
    llama_like_dims,
    swiglu_rmsnorm_decoder_config,
    tied_embeddings,
    untied_embeddings,
)

L = "model.layers.{layer}."


def qwen2_config(hf: HFConfig) -> dict[str, Any]:
    return {**swiglu_rmsnorm_decoder_config(hf, llama_like_dims(hf)), "add_qkv_bias": True}


def lm_head_beside_tied_embeddings(hf: HFConfig) -> tuple[str, ...]:
    return ("lm_head.weight",) if tied_embeddings(hf) else ()


# Rows shared by the Qwen decoders; qwen3.py and qwen3_moe.py reuse them.
EMBEDDINGS = (
    Param(
        "embedding.word_embeddings.weight",
        "model.embed_tokens.weight",
        ("vocab", "hidden"),
        PAD_VOCAB,
    ),
    Param(
        "output_layer.weight", "lm_head.weight", ("vocab", "hidden"), PAD_VOCAB, untied_embeddings
    ),
    Param("decoder.final_layernorm.weight", "model.norm.weight", ("hidden",)),
)

ATTENTION = (
    Param(
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        L + "input_layernorm.weight",
        ("hidden",),
    ),
    Param(
        "decoder.layers.self_attention.linear_qkv.weight",
        (
            L + "self_attn.q_proj.weight",
            L + "self_attn.k_proj.weight",
            L + "self_attn.v_proj.weight",
        ),
        (("q_dim", "hidden"), ("kv_dim", "hidden"), ("kv_dim", "hidden")),
        INTERLEAVE_QKV,
    ),
    Param(
        "decoder.layers.self_attention.linear_proj.weight",
        L + "self_attn.o_proj.weight",
        ("hidden", "q_dim"),
    ),
)

QKV_BIAS = Param(
    "decoder.layers.self_attention.linear_qkv.bias",
    (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
    (("q_dim",), ("kv_dim",), ("kv_dim",)),
    INTERLEAVE_QKV,
)

DENSE_MLP = (
    Param(
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        L + "post_attention_layernorm.weight",
        ("hidden",),
    ),
    Param(
        "decoder.layers.mlp.linear_fc1.weight",
        (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
        (("ffn", "hidden"), ("ffn", "hidden")),
        CONCAT_ROWS,
    ),
    Param("decoder.layers.mlp.linear_fc2.weight", L + "mlp.down_proj.weight", ("hidden", "ffn")),
)

FAMILY = ModelFamily(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    config=qwen2_config,
    params=(*EMBEDDINGS, *ATTENTION, QKV_BIAS, *DENSE_MLP),
    ignored_hf=lm_head_beside_tied_embeddings,
    hf_config_class="Qwen2Config",
)
