"""Qwen3.5 MoE / Qwen3.6 MoE (`Qwen3_5MoeForCausalLM`, and the language model of the published
`Qwen3_5MoeForConditionalGeneration` checkpoints, e.g. Qwen3.5-35B-A3B): the Qwen3.5 hybrid
decoder (see ``qwen3_5.py``) with a routed + shared-expert MoE in every layer.

What matters for identical logits:
  * routing: softmax over all experts in fp32, top k, renormalised over the k (transformers'
    router always renormalises); Megatron's ``moe_router_pre_softmax=False`` (top k of the
    logits, softmax over those) is the same function;
  * the shared expert is a SwiGLU MLP whose output is scaled by ``sigmoid(x @ g)``, ``g`` =
    ``shared_expert_gate`` [1, hidden]: Megatron's shared experts with
    ``moe_shared_expert_gate`` (``shared_experts.gate_weight``, same shape, same input: the
    pre-MLP-normed hidden states);
  * transformers' ``Qwen3_5MoeTextConfig`` has no dense MLP, no ``decoder_sparse_step`` and no
    ``mlp_only_layers``: every layer is MoE whatever those keys say, so a config asking for
    dense layers is refused rather than converted to something transformers does not build.
The MTP layer (see ``qwen3_5.py``) is an MoE layer too; its experts' HF layout is read on its
own (group ``mtp_experts``): Qwen3.5 files store them per expert, Qwen3.6 files packed.
Routed experts are read packed (``experts.gate_up_proj`` / ``down_proj``, the published files)
or per expert (``experts.{e}.gate_proj.weight`` ..., what transformers 5 ``save_pretrained``
writes), whichever the checkpoint has; export writes the layout it came from.
"""

from __future__ import annotations

from typing import Any

from megatron_eaft.models.families.qwen2 import EMBEDDINGS, L, lm_head_beside_tied_embeddings
from megatron_eaft.models.families.qwen3_5 import (
    GATED_ATTENTION,
    GATED_DELTA_NET,
    mtp_layers,
    qwen3_5_block_spec,
    qwen3_5_config,
    qwen3_5_dims,
    qwen3_5_gpt_model_kwargs,
    qwen3_5_layouts,
    qwen3_5_mtp_layer_spec,
    qwen3_5_mtp_rows,
)
from megatron_eaft.models.family import (
    CONCAT_ROWS,
    Dims,
    HFConfig,
    ModelFamily,
    Param,
    routed_expert_rows,
)


def qwen3_5_moe_dims(hf: HFConfig) -> Dims:
    base = qwen3_5_dims(hf)
    extra = {**base.extra, "shared_ffn": hf.integer("shared_expert_intermediate_size")}
    return Dims(**{**base.__dict__, "ffn": base.moe_ffn, "extra": extra})


def qwen3_5_moe_config(hf: HFConfig) -> dict[str, Any]:
    dims = qwen3_5_moe_dims(hf)
    if dims.experts < 1:
        raise hf.unsupported("num_experts", dims.experts, "a MoE config needs experts")
    every_layer_moe = "transformers' Qwen3.5-MoE builds every layer as an MoE layer"
    hf.reject_unless("decoder_sparse_step", lambda v: v in (None, 1), every_layer_moe)
    hf.reject_unless("mlp_only_layers", lambda v: not v, every_layer_moe)
    topk = hf.integer("num_experts_per_tok")
    if not 1 <= topk <= dims.experts:
        raise hf.unsupported("num_experts_per_tok", topk, f"must be in 1..{dims.experts}")
    if dims.moe_ffn < 1:
        raise hf.unsupported("moe_intermediate_size", dims.moe_ffn, "must be positive")
    if dims.extra["shared_ffn"] < 1:
        raise hf.unsupported(
            "shared_expert_intermediate_size",
            dims.extra["shared_ffn"],
            "transformers always builds the shared expert; it must be positive",
        )
    return {
        **qwen3_5_config(hf),
        # No dense MLP anywhere; Megatron still wants a size.
        "ffn_hidden_size": dims.moe_ffn,
        "num_moe_experts": dims.experts,
        "moe_layer_freq": 1,
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": dims.moe_ffn,
        "moe_shared_expert_intermediate_size": dims.extra["shared_ffn"],
        "moe_shared_expert_gate": True,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": False,
        # HF computes the routing softmax in fp32.
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0)),
    }


MLP = "decoder.layers.mlp."

MOE = (
    # MoE layers keep a separate pre-MLP norm (no fused fc1 in front of the router): measured
    # with the local hybrid spec; Transformer Engine's MoE spec has one too (see qwen3_moe.py).
    Param(
        "decoder.layers.pre_mlp_layernorm.weight",
        L + "post_attention_layernorm.weight",
        ("hidden",),
    ),
    Param(MLP + "router.weight", L + "mlp.gate.weight", ("experts", "hidden")),
    *routed_expert_rows(L + "mlp.experts."),
    Param(
        MLP + "shared_experts.linear_fc1.weight",
        (L + "mlp.shared_expert.gate_proj.weight", L + "mlp.shared_expert.up_proj.weight"),
        (("shared_ffn", "hidden"), ("shared_ffn", "hidden")),
        CONCAT_ROWS,
    ),
    Param(
        MLP + "shared_experts.linear_fc2.weight",
        L + "mlp.shared_expert.down_proj.weight",
        ("hidden", "shared_ffn"),
    ),
    Param(MLP + "shared_experts.gate_weight", L + "mlp.shared_expert_gate.weight", (1, "hidden")),
)

FAMILY = ModelFamily(
    name="qwen3_5_moe",
    architectures=("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"),
    config=qwen3_5_moe_config,
    dims=qwen3_5_moe_dims,
    params=(*EMBEDDINGS, *GATED_ATTENTION, *GATED_DELTA_NET, *MOE, *qwen3_5_mtp_rows(MOE)),
    gpt_model_kwargs=qwen3_5_gpt_model_kwargs,
    block_spec_fn=qwen3_5_block_spec,
    mtp_layers=mtp_layers,
    mtp_layer_spec_fn=qwen3_5_mtp_layer_spec,
    ignored_hf=lm_head_beside_tied_embeddings,
    hf_config_class="Qwen3_5MoeTextConfig",
    layouts=qwen3_5_layouts("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"),
)
