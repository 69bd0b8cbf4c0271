"""Qwen3 dense (`Qwen3ForCausalLM`): Qwen2 without q/k/v biases, plus per-head q/k RMSNorm.

`head_dim` is its own setting (128 for every released size, != hidden / heads for 4B and 32B;
transformers' `Qwen3Config` defaults it to 128 where config.json is silent).
"""

from __future__ import annotations

from typing import Any

from megatron_eaft.models.families.qwen2 import (
    ATTENTION,
    DENSE_MLP,
    EMBEDDINGS,
    L,
    lm_head_beside_tied_embeddings,
)
from megatron_eaft.models.family import (
    HFConfig,
    ModelFamily,
    Param,
    llama_like_dims,
    swiglu_rmsnorm_decoder_config,
)


def qwen3_config(hf: HFConfig) -> dict[str, Any]:
    # attention_bias would add a bias to o_proj too; Megatron's add_bias_linear would then add
    # one to every linear layer, which Qwen3 does not have.
    hf.reject_unless("attention_bias", lambda v: not v, "biases on Qwen3 attention projections")
    return {**swiglu_rmsnorm_decoder_config(hf, llama_like_dims(hf)), "qk_layernorm": True}


QK_NORMS = (
    Param(
        "decoder.layers.self_attention.q_layernorm.weight",
        L + "self_attn.q_norm.weight",
        ("head_dim",),
    ),
    Param(
        "decoder.layers.self_attention.k_layernorm.weight",
        L + "self_attn.k_norm.weight",
        ("head_dim",),
    ),
)

FAMILY = ModelFamily(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    config=qwen3_config,
    params=(*EMBEDDINGS, *ATTENTION, *QK_NORMS, *DENSE_MLP),
    ignored_hf=lm_head_beside_tied_embeddings,
    hf_config_class="Qwen3Config",
)
