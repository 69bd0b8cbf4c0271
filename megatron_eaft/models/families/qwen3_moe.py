"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3 attention, every layer a top-k softmax MoE.

HF routes with softmax over all experts, keeps the top k and, with `norm_topk_prob`,
renormalises them; Megatron's `moe_router_pre_softmax=False` (top k of the logits, then
softmax over those k) is the same function, and `pre_softmax=True` is the unnormalised one.

HF experts are read per expert (the published files) or packed (``experts.gate_up_proj``, how
transformers 5 holds them), whichever the checkpoint has (``routed_expert_rows``).

Checkpoint layout: experts are stored per expert under
`decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight` with [layer, expert] leading axes.
Megatron-Core writes that layout for both the sequential experts of the local spec and
Transformer Engine's grouped GEMM (TEGroupedMLP maps its `weight{e}` to the same keys), so one
converted checkpoint loads with `moe_grouped_gemm` on or off. The specs disagree on one key: the
local spec files the MoE layer's `pre_mlp_layernorm` under the fused-TE name
`mlp.linear_fc1.layer_norm_weight`, the Transformer Engine MoE spec keeps a separate
`pre_mlp_layernorm` (no fused fc1 norm in front of the router); hence the per-impl key below.
"""

from __future__ import annotations

from typing import Any

from megatron_eaft.models.families.qwen2 import (
    ATTENTION,
    EMBEDDINGS,
    L,
    lm_head_beside_tied_embeddings,
)
from megatron_eaft.models.families.qwen3 import QK_NORMS, qwen3_config
from megatron_eaft.models.family import (
    PER_EXPERT,
    HFConfig,
    ModelFamily,
    Param,
    llama_like_dims,
    routed_expert_rows,
)


def qwen3_moe_config(hf: HFConfig) -> dict[str, Any]:
    dims = llama_like_dims(hf)
    if dims.experts < 1:
        raise hf.unsupported("num_experts", dims.experts, "a MoE config needs experts")
    hf.reject_unless("decoder_sparse_step", lambda v: v in (None, 1), "only all-MoE layers convert")
    hf.reject_unless("mlp_only_layers", lambda v: not v, "dense layers between MoE layers")
    hf.reject_unless(
        "shared_expert_intermediate_size", lambda v: not v, "Qwen3-MoE has no shared expert"
    )
    topk = hf.integer("num_experts_per_tok")
    if not 1 <= topk <= dims.experts:
        raise hf.unsupported("num_experts_per_tok", topk, f"must be in 1..{dims.experts}")
    if dims.moe_ffn < 1:
        raise hf.unsupported("moe_intermediate_size", dims.moe_ffn, "must be positive")
    return {
        **qwen3_config(hf),
        "num_moe_experts": dims.experts,
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": dims.moe_ffn,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not hf.get("norm_topk_prob", False),
        # HF computes the routing softmax in fp32.
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0)),
    }


MOE_MLP = (
    Param(
        {
            "local": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
            "transformer_engine": "decoder.layers.pre_mlp_layernorm.weight",
        },
        L + "post_attention_layernorm.weight",
        ("hidden",),
    ),
    Param("decoder.layers.mlp.router.weight", L + "mlp.gate.weight", ("experts", "hidden")),
    # Published Qwen3-MoE files are per expert; transformers 5 holds the experts packed.
    *routed_expert_rows(L + "mlp.experts.", default=PER_EXPERT),
)

FAMILY = ModelFamily(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    config=qwen3_moe_config,
    params=(*EMBEDDINGS, *ATTENTION, *QK_NORMS, *MOE_MLP),
    ignored_hf=lm_head_beside_tied_embeddings,
    # Qwen3MoeConfig has no head_dim: a config.json without one means hidden / heads.
    hf_config_class="Qwen3MoeConfig",
)
