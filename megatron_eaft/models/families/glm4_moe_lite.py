"""GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`): multi-latent attention (MLA), a dense first
layer, then MoE layers with sigmoid routing, an expert bias and shared experts.

What matters for identical logits:
  * MLA is Megatron's ``MLATransformerConfig`` (``q_lora_rank``, ``kv_lora_rank``,
    ``qk_head_dim`` = HF ``qk_nope_head_dim``, ``qk_pos_emb_head_dim`` = ``qk_rope_head_dim``,
    ``v_head_dim``). Its RoPE defaults to YaRN (factor 40): plain RoPE is ``rope_type="rope"``
    with scaling factor 1 (softmax scale 1 / sqrt(qk head dim), as HF's). Megatron's MLA always
    rotates DeepSeek-style interleaved pairs and writes them back de-interleaved, which is HF's
    ``rope_interleave=True``; ``False`` is refused.
  * HF's projections already have Megatron's layouts (per head [nope; rope] for q, [latent; rope]
    for the kv down projection, per head [nope; v] for the kv up projection): all copies.
  * the q / kv latent RMSNorms: transformers builds them with eps 1e-6 whatever
    ``rms_norm_eps`` says; Megatron would use ``layernorm_epsilon``. The family's layer spec
    (``cpu_specs.mla_decoder_block_spec``) builds them as separate norms with eps 1e-6, under
    the checkpoint keys Transformer Engine's fused norm+linear uses
    (``linear_q_up_proj.layer_norm_weight``, ``linear_kv_up_proj.layer_norm_weight``).
  * routing: sigmoid scores, top k of score + ``e_score_correction_bias`` (Megatron's
    ``router.expert_bias``), weights = the unbiased scores renormalised over the k (HF
    ``norm_topk_prob``; Megatron's sigmoid path always renormalises, so False is refused),
    times ``routed_scaling_factor``. Group-limited routing (``n_group`` / ``topk_group``)
    ranks a group by the sum of its top 2 scores in HF and of its top k / topk_group in
    Megatron: only configs where the two agree convert. The expert bias stays fixed while
    fine-tuning (``moe_router_bias_update_rate`` 0), as in transformers.
  * dense layers where ``mlp_layer_types`` says ``dense`` (transformers' reading; the
    published ``first_k_dense_replace`` must agree): ``moe_layer_freq`` as a list, hence
    per-layer checkpoint keys.
The multi-token-prediction (MTP) layers (``num_nextn_predict_layers``, stored as
``model.layers.{num_hidden_layers + i}``, which transformers does not build) are Megatron's MTP
layers: ``enorm`` / ``hnorm`` / ``eh_proj`` (input [embedding; hidden]) / ``shared_head.norm``
(``final_layernorm``) and an MLA + MoE decoder layer stored as the decoder's. Where the layer
also holds copies of the embedding and output layer (``embed_tokens``, ``shared_head.head``, as
DeepSeek-style checkpoints do): Megatron's MTP layers use the model's own embedding and output
layer, so import checks the copies equal them and export writes them from the exported (so
fine-tuned) tensors; copies that differ are carried byte-identical instead, with a warning.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_eaft.models.families.qwen2 import EMBEDDINGS, L, lm_head_beside_tied_embeddings
from megatron_eaft.models.family import (
    CONCAT_ROWS,
    Dims,
    HFConfig,
    ModelFamily,
    Param,
    mtp_head_rows,
    mtp_layer_rows,
    rope_gpt_model_kwargs,
)

DENSE = "dense"
SPARSE = "sparse"
# transformers' Glm4MoeLiteAttention builds q_a_layernorm / kv_a_layernorm with this eps.
LATENT_NORM_EPS = 1e-6


def mlp_layer_types(hf: HFConfig) -> list[str]:
    types = hf.require("mlp_layer_types")
    layers = hf.integer("num_hidden_layers")
    if not isinstance(types, list) or len(types) != layers:
        raise hf.unsupported("mlp_layer_types", types, f"must list one kind per layer ({layers})")
    unknown = sorted({t for t in types if t not in (DENSE, SPARSE)})
    if unknown:
        raise hf.unsupported("mlp_layer_types", unknown, f"only {DENSE!r} and {SPARSE!r} convert")
    first_dense = hf.to_dict().get("first_k_dense_replace")
    if first_dense is not None:
        implied = [DENSE if i < first_dense else SPARSE for i in range(layers)]
        if implied != types:
            raise hf.unsupported(
                "first_k_dense_replace",
                first_dense,
                f"disagrees with mlp_layer_types {types} (transformers builds mlp_layer_types)",
            )
    return types


def is_dense(hf: HFConfig, layer: int) -> bool:
    return mlp_layer_types(hf)[layer] == DENSE


def is_sparse(hf: HFConfig, layer: int) -> bool:
    return mlp_layer_types(hf)[layer] == SPARSE


def has_shared_experts(hf: HFConfig) -> bool:
    return hf.integer("n_shared_experts", 0) > 0


def glm4_moe_lite_dims(hf: HFConfig) -> Dims:
    heads = hf.integer("num_attention_heads")
    nope, rope = hf.integer("qk_nope_head_dim"), hf.integer("qk_rope_head_dim")
    v_head = hf.integer("v_head_dim")
    kv_lora = hf.integer("kv_lora_rank")
    moe_ffn = hf.integer("moe_intermediate_size")
    extra = {
        "q_lora": hf.integer("q_lora_rank"),
        "kv_lora": kv_lora,
        "q_up": heads * (nope + rope),
        "kv_down": kv_lora + rope,
        "kv_up": heads * (nope + v_head),
        "attn_out": heads * v_head,
        "shared_ffn": moe_ffn * hf.integer("n_shared_experts", 0),
    }
    return Dims(
        layers=hf.integer("num_hidden_layers"),
        hidden=hf.integer("hidden_size"),
        ffn=hf.integer("intermediate_size"),
        vocab=hf.integer("vocab_size"),
        heads=heads,
        groups=heads,
        head_dim=nope + rope,
        experts=hf.integer("n_routed_experts"),
        moe_ffn=moe_ffn,
        extra=extra,
    )


def _routing(hf: HFConfig, dims: Dims) -> dict[str, Any]:
    topk = hf.integer("num_experts_per_tok")
    if not 1 <= topk <= dims.experts:
        raise hf.unsupported("num_experts_per_tok", topk, f"must be in 1..{dims.experts}")
    if topk > 1 and not hf.get("norm_topk_prob", True):
        raise hf.unsupported(
            "norm_topk_prob", False, "Megatron's sigmoid routing always renormalises the top k"
        )
    groups, group_topk = hf.integer("n_group", 1), hf.integer("topk_group", 1)
    if groups < 1 or dims.experts % groups or not 1 <= group_topk <= groups:
        raise hf.unsupported(
            "n_group", groups, "needs n_group | n_routed_experts and 1 <= topk_group <= n_group"
        )
    grouped = groups > 1
    if grouped and (topk % group_topk or topk // group_topk != 2):
        raise hf.unsupported(
            "topk_group",
            group_topk,
            "HF ranks expert groups by their top 2 scores, Megatron by their top "
            "num_experts_per_tok / topk_group; they agree only when that is 2",
        )
    return {
        "num_moe_experts": dims.experts,
        "moe_ffn_hidden_size": dims.moe_ffn,
        "moe_layer_freq": [int(t == SPARSE) for t in mlp_layer_types(hf)],
        "moe_router_topk": topk,
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_bias_update_rate": 0.0,
        "moe_router_topk_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
        "moe_router_num_groups": groups if grouped else None,
        "moe_router_group_topk": group_topk if grouped else None,
        # HF computes router logits and scores in fp32.
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_shared_expert_intermediate_size": dims.extra["shared_ffn"] or None,
        "moe_shared_expert_overlap": False,
    }


def glm4_moe_lite_config(hf: HFConfig) -> dict[str, Any]:
    hf.reject_unless(
        "q_lora_rank",
        lambda v: v,
        "a query without a low-rank projection needs Transformer Engine's fused norm+linear",
    )
    dims = glm4_moe_lite_dims(hf)
    hf.reject_unless("hidden_act", lambda v: v in (None, "silu"), "only SiLU-gated MLPs convert")
    hf.reject_unless("attention_bias", lambda v: not v, "Megatron's MLA has no projection biases")
    hf.reject_unless(
        "rope_interleave",
        lambda v: v in (None, True),
        "Megatron's MLA rotates interleaved pairs (HF rope_interleave=True) only",
    )
    hf.require_plain_rope()
    heads = dims.heads
    if hf.integer("num_key_value_heads", heads) != heads:
        raise hf.unsupported(
            "num_key_value_heads", hf.get("num_key_value_heads"), "MLA has one kv head per head"
        )
    return {
        "num_layers": dims.layers,
        "hidden_size": dims.hidden,
        "ffn_hidden_size": dims.ffn,
        "num_attention_heads": heads,
        "num_query_groups": heads,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-5)),
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": 0.0,
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        # MLA (MLATransformerConfig); qk_layernorm = the q / kv latent norms.
        "multi_latent_attention": True,
        "qk_layernorm": True,
        "q_lora_rank": dims.extra["q_lora"],
        "kv_lora_rank": dims.extra["kv_lora"],
        "qk_head_dim": hf.integer("qk_nope_head_dim"),
        "qk_pos_emb_head_dim": hf.integer("qk_rope_head_dim"),
        "v_head_dim": hf.integer("v_head_dim"),
        "rope_type": "rope",
        "rotary_base": hf.rope_theta(10000.0),
        "rotary_percent": 1.0,
        "rotary_scaling_factor": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        **_routing(hf, dims),
    }


def glm4_moe_lite_gpt_model_kwargs(hf: HFConfig) -> dict[str, Any]:
    # MLA builds its rotary embedding from the config; GPTModel's own is skipped under MLA.
    return rope_gpt_model_kwargs(hf)


def mtp_layers(hf: HFConfig) -> int:
    return hf.integer("num_nextn_predict_layers", 0)


def mtp_hf_offset(hf: HFConfig) -> int:
    """HF numbers the MTP layers after the decoder's: ``model.layers.{num_hidden_layers}``."""
    return hf.integer("num_hidden_layers")


# HF copies of the embedding and output layer in each MTP layer (when the checkpoint has them).
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def mtp_copy_sources(hf: HFConfig) -> dict[str, str]:
    """Each MTP layer's copy of the embedding and of the output layer, and what it copies."""
    first = mtp_hf_offset(hf)
    head = "model.embed_tokens.weight" if hf.get("tie_word_embeddings") else "lm_head.weight"
    sources = dict(zip(MTP_COPIES, ("model.embed_tokens.weight", head), strict=True))
    return {
        f"model.layers.{first + i}.{name}": source
        for i in range(mtp_layers(hf))
        for name, source in sources.items()
    }


def mtp_copies(hf: HFConfig) -> tuple[str, ...]:
    """Carried when present (written back as they were) unless they equal their source."""
    return tuple(mtp_copy_sources(hf))


def glm4_moe_lite_block_spec(config: Any, transformer_impl: str, vp_stage: int | None) -> Any:
    from megatron_eaft.models.cpu_specs import mla_decoder_block_spec

    return mla_decoder_block_spec(config, transformer_impl, vp_stage, LATENT_NORM_EPS)


def glm4_moe_lite_mtp_layer_spec(config: Any, transformer_impl: str) -> Any:
    """The MTP layer's inner layer: an MLA + MoE decoder layer."""
    from megatron_eaft.models.cpu_specs import mla_layer_spec

    return mla_layer_spec(config, transformer_impl, True, LATENT_NORM_EPS)


A = "decoder.layers.self_attention."
ATTN = L + "self_attn."
E = "mlp.experts.{expert}."

MLA = (
    Param("decoder.layers.input_layernorm.weight", L + "input_layernorm.weight", ("hidden",)),
    Param(A + "linear_q_down_proj.weight", ATTN + "q_a_proj.weight", ("q_lora", "hidden")),
    Param(A + "linear_q_up_proj.layer_norm_weight", ATTN + "q_a_layernorm.weight", ("q_lora",)),
    Param(A + "linear_q_up_proj.weight", ATTN + "q_b_proj.weight", ("q_up", "q_lora")),
    Param(
        A + "linear_kv_down_proj.weight",
        ATTN + "kv_a_proj_with_mqa.weight",
        ("kv_down", "hidden"),
    ),
    Param(A + "linear_kv_up_proj.layer_norm_weight", ATTN + "kv_a_layernorm.weight", ("kv_lora",)),
    Param(A + "linear_kv_up_proj.weight", ATTN + "kv_b_proj.weight", ("kv_up", "kv_lora")),
    Param(A + "linear_proj.weight", ATTN + "o_proj.weight", ("hidden", "attn_out")),
)

DENSE_MLP = (
    Param(
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        L + "post_attention_layernorm.weight",
        ("hidden",),
        layers=is_dense,
    ),
    Param(
        "decoder.layers.mlp.linear_fc1.weight",
        (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
        (("ffn", "hidden"), ("ffn", "hidden")),
        CONCAT_ROWS,
        layers=is_dense,
    ),
    Param(
        "decoder.layers.mlp.linear_fc2.weight",
        L + "mlp.down_proj.weight",
        ("hidden", "ffn"),
        layers=is_dense,
    ),
)

MOE_MLP = (
    Param(
        "decoder.layers.pre_mlp_layernorm.weight",
        L + "post_attention_layernorm.weight",
        ("hidden",),
        layers=is_sparse,
    ),
    Param(
        "decoder.layers.mlp.router.weight",
        L + "mlp.gate.weight",
        ("experts", "hidden"),
        layers=is_sparse,
    ),
    Param(
        "decoder.layers.mlp.router.expert_bias",
        L + "mlp.gate.e_score_correction_bias",
        ("experts",),
        layers=is_sparse,
        # fp32 in both: transformers keeps it so (_keep_in_fp32_modules_strict), Megatron too.
        dtype=torch.float32,
    ),
    Param(
        "decoder.layers.mlp.experts.experts.linear_fc1.weight",
        (L + E + "gate_proj.weight", L + E + "up_proj.weight"),
        (("moe_ffn", "hidden"), ("moe_ffn", "hidden")),
        CONCAT_ROWS,
        layers=is_sparse,
    ),
    Param(
        "decoder.layers.mlp.experts.experts.linear_fc2.weight",
        L + E + "down_proj.weight",
        ("hidden", "moe_ffn"),
        layers=is_sparse,
    ),
    Param(
        "decoder.layers.mlp.shared_experts.linear_fc1.weight",
        (L + "mlp.shared_experts.gate_proj.weight", L + "mlp.shared_experts.up_proj.weight"),
        (("shared_ffn", "hidden"), ("shared_ffn", "hidden")),
        CONCAT_ROWS,
        when=has_shared_experts,
        layers=is_sparse,
    ),
    Param(
        "decoder.layers.mlp.shared_experts.linear_fc2.weight",
        L + "mlp.shared_experts.down_proj.weight",
        ("hidden", "shared_ffn"),
        when=has_shared_experts,
        layers=is_sparse,
    ),
)

FAMILY = ModelFamily(
    name="glm4_moe_lite",
    architectures=("Glm4MoeLiteForCausalLM",),
    config=glm4_moe_lite_config,
    dims=glm4_moe_lite_dims,
    params=(
        *EMBEDDINGS,
        *MLA,
        *DENSE_MLP,
        *MOE_MLP,
        *mtp_head_rows(
            "model.layers.{mtp}.",
            {
                "enorm": "enorm.weight",
                "hnorm": "hnorm.weight",
                "eh_proj": "eh_proj.weight",
                "final_layernorm": "shared_head.norm.weight",
            },
        ),
        *mtp_layer_rows((*MLA, *MOE_MLP), L, "model.layers.{mtp}."),
    ),
    gpt_model_kwargs=glm4_moe_lite_gpt_model_kwargs,
    block_spec_fn=glm4_moe_lite_block_spec,
    ignored_hf=lm_head_beside_tied_embeddings,
    hf_config_class="Glm4MoeLiteConfig",
    megatron_config_class="MLATransformerConfig",
    carried_hf=mtp_copies,
    hf_copies=mtp_copy_sources,
    mtp_layers=mtp_layers,
    mtp_hf_offset=mtp_hf_offset,
    mtp_layer_spec_fn=glm4_moe_lite_mtp_layer_spec,
)
