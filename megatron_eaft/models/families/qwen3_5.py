"""Qwen3.5 dense (`Qwen3_5ForCausalLM`, and the language model of the published
`Qwen3_5ForConditionalGeneration` checkpoints): Gated DeltaNet layers with a gated full
attention layer every `full_attention_interval` (`layer_types`).

What matters for identical logits:
  * layers differ, so Megatron-Core writes per-layer keys (`decoder.layers.{i}.`) and the
    decoder is Megatron's hybrid block (`experimental_attention_variant="gated_delta_net"`,
    `linear_attention_freq` = the `layer_types` pattern, 1 = linear attention);
  * every RMSNorm is zero-centred in HF already (`(1 + w) * x`), which is Megatron's
    `layernorm_zero_centered_gamma`, except the Gated DeltaNet output norm (`w * x`): stored
    as `w - 1`;
  * gated attention: HF `q_proj` holds [query; gate] per head, Megatron's fused QKV is
    [queries; gates; key; value] per query group (`attention_output_gate`);
  * Gated DeltaNet `in_proj_qkv` and `conv1d` are [query; key; value] by rows, Megatron keeps
    the three (and z, beta, alpha) as separate checkpoint tensors;
  * partial RoPE (`partial_rotary_factor` 0.25, rotate-half). `mrope_section` splits the rotary
    frequencies between temporal / height / width position ids; for text the three ids are
    equal, so M-RoPE is plain RoPE over the rotated dims (transformers' own text positions).
The vision tower (`model.visual.*`) is carried through byte-identical, not converted.

The multi-token-prediction (MTP) layer (`mtp.*`, which transformers does not build) is
Megatron's MTP layer (`mtp_num_layers` = `mtp_num_hidden_layers`, at most 1: Qwen3.5 shares one
`mtp.fc` and one set of pre-fc norms between its MTP layers, Megatron gives each layer its own):
`mtp.pre_fc_norm_embedding` / `pre_fc_norm_hidden` / `fc` / `norm` are `enorm` / `hnorm` /
`eh_proj` / `final_layernorm` (fc's input is [embedding; hidden], as `eh_proj`'s; zero-centred
norms, as the decoder's), and `mtp.layers.0.*` is a gated full-attention decoder layer, stored
as the decoder's are. Both take the decoder's output after its final norm.
"""

from __future__ import annotations

from typing import Any

from megatron_eaft.models.families.qwen2 import (
    DENSE_MLP,
    EMBEDDINGS,
    L,
    lm_head_beside_tied_embeddings,
)
from megatron_eaft.models.families.qwen3 import QK_NORMS
from megatron_eaft.models.family import (
    COPY,
    INTERLEAVE_GATED_QKV,
    MTP_PREFIX,
    ZERO_CENTERED_NORM,
    Dims,
    HFConfig,
    HFLayout,
    ModelFamily,
    Param,
    ShapeSpec,
    SplitRows,
    Transform,
    llama_like_dims,
    mtp_head_rows,
    mtp_layer_rows,
    rope_gpt_model_kwargs,
    swiglu_rmsnorm_decoder_config,
)

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"


def layer_types(hf: HFConfig) -> list[str]:
    """Each layer's kind, as transformers reads it (`layer_types`, else derived from
    `full_attention_interval`)."""
    types = hf.require("layer_types")
    layers = hf.integer("num_hidden_layers")
    if not isinstance(types, list) or len(types) != layers:
        raise hf.unsupported("layer_types", types, f"must list one kind per layer ({layers})")
    unknown = sorted({t for t in types if t not in (LINEAR_ATTENTION, FULL_ATTENTION)})
    if unknown:
        raise hf.unsupported(
            "layer_types", unknown, f"only {LINEAR_ATTENTION!r} and {FULL_ATTENTION!r} convert"
        )
    return types


def is_linear_attention(hf: HFConfig, layer: int) -> bool:
    return layer_types(hf)[layer] == LINEAR_ATTENTION


def is_full_attention(hf: HFConfig, layer: int) -> bool:
    return layer_types(hf)[layer] == FULL_ATTENTION


def qwen3_5_dims(hf: HFConfig) -> Dims:
    base = llama_like_dims(hf)
    key_heads = hf.integer("linear_num_key_heads")
    value_heads = hf.integer("linear_num_value_heads")
    key_dim = hf.integer("linear_key_head_dim")
    value_dim = hf.integer("linear_value_head_dim")
    if key_heads == 0 or value_heads % key_heads:
        raise hf.unsupported(
            "linear_num_value_heads",
            value_heads,
            f"must be a multiple of linear_num_key_heads={key_heads}",
        )
    extra = {
        "lin_v_heads": value_heads,
        "lin_v_head_dim": value_dim,
        "lin_qk": key_heads * key_dim,
        "lin_v": value_heads * value_dim,
        "lin_conv": 2 * key_heads * key_dim + value_heads * value_dim,
        "lin_kernel": hf.integer("linear_conv_kernel_dim"),
    }
    return Dims(**{**base.__dict__, "extra": extra})


def partial_rotary_factor(hf: HFConfig) -> float:
    factor = hf.rope_parameters.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
        raise hf.unsupported("partial_rotary_factor", factor, "must be a number in (0, 1]")
    return float(factor)


def mtp_layers(hf: HFConfig) -> int:
    """`mtp_num_hidden_layers`: 0 or 1 (see the module docstring)."""
    layers = hf.integer("mtp_num_hidden_layers", 0)
    if layers > 1:
        raise hf.unsupported(
            "mtp_num_hidden_layers",
            layers,
            "Qwen3.5's MTP layers share one mtp.fc and its norms; Megatron's have their own",
        )
    return layers


def has_mtp(hf: HFConfig) -> bool:
    return mtp_layers(hf) > 0


def qwen3_5_config(hf: HFConfig) -> dict[str, Any]:
    dims = qwen3_5_dims(hf)
    mtp_layers(hf)  # validated before any tensor moves
    types = layer_types(hf)
    hf.reject_unless("attention_bias", lambda v: not v, "biases on Qwen3.5 attention projections")
    partial_rotary_factor(hf)  # validated before any tensor moves
    return {
        **swiglu_rmsnorm_decoder_config(hf, dims, full_attention_only=False),
        "qk_layernorm": True,
        "layernorm_zero_centered_gamma": True,
        "attention_output_gate": True,
        "experimental_attention_variant": "gated_delta_net",
        "linear_attention_freq": [int(t == LINEAR_ATTENTION) for t in types],
        "linear_conv_kernel_dim": dims.extra["lin_kernel"],
        "linear_key_head_dim": hf.integer("linear_key_head_dim"),
        "linear_value_head_dim": hf.integer("linear_value_head_dim"),
        "linear_num_key_heads": hf.integer("linear_num_key_heads"),
        "linear_num_value_heads": hf.integer("linear_num_value_heads"),
    }


def qwen3_5_gpt_model_kwargs(hf: HFConfig) -> dict[str, Any]:
    return {**rope_gpt_model_kwargs(hf), "rotary_percent": partial_rotary_factor(hf)}


A = "decoder.layers.self_attention."
GDN = L + "linear_attn."

GATED_ATTENTION = (
    Param(
        A + "linear_qkv.layer_norm_weight",
        L + "input_layernorm.weight",
        ("hidden",),
        layers=is_full_attention,
    ),
    Param(
        A + "linear_qkv.weight",
        (
            L + "self_attn.q_proj.weight",
            L + "self_attn.k_proj.weight",
            L + "self_attn.v_proj.weight",
        ),
        (("2*q_dim", "hidden"), ("kv_dim", "hidden"), ("kv_dim", "hidden")),
        INTERLEAVE_GATED_QKV,
        layers=is_full_attention,
    ),
    Param(
        A + "linear_proj.weight",
        L + "self_attn.o_proj.weight",
        ("hidden", "q_dim"),
        layers=is_full_attention,
    ),
    *(Param(p.megatron, p.hf, p.shapes, p.transform, layers=is_full_attention) for p in QK_NORMS),
)


def gated_delta_net_row(
    megatron: str | tuple[str, ...], hf: str, shape: ShapeSpec, transform: Transform = COPY
) -> Param:
    return Param(megatron, hf, shape, transform, layers=is_linear_attention)


QKV_ROWS = SplitRows("lin_qk", "lin_qk", "lin_v")

GATED_DELTA_NET = (
    gated_delta_net_row(A + "in_proj.layer_norm_weight", L + "input_layernorm.weight", ("hidden",)),
    gated_delta_net_row(
        (A + "in_proj.weight.query", A + "in_proj.weight.key", A + "in_proj.weight.value"),
        GDN + "in_proj_qkv.weight",
        ("lin_conv", "hidden"),
        QKV_ROWS,
    ),
    gated_delta_net_row(A + "in_proj.weight.z", GDN + "in_proj_z.weight", ("lin_v", "hidden")),
    gated_delta_net_row(
        A + "in_proj.weight.beta", GDN + "in_proj_b.weight", ("lin_v_heads", "hidden")
    ),
    gated_delta_net_row(
        A + "in_proj.weight.alpha", GDN + "in_proj_a.weight", ("lin_v_heads", "hidden")
    ),
    gated_delta_net_row(
        (A + "conv1d.weight.query", A + "conv1d.weight.key", A + "conv1d.weight.value"),
        GDN + "conv1d.weight",
        ("lin_conv", 1, "lin_kernel"),
        QKV_ROWS,
    ),
    gated_delta_net_row(A + "A_log", GDN + "A_log", ("lin_v_heads",)),
    gated_delta_net_row(A + "dt_bias", GDN + "dt_bias", ("lin_v_heads",)),
    gated_delta_net_row(
        A + "out_norm.weight", GDN + "norm.weight", ("lin_v_head_dim",), ZERO_CENTERED_NORM
    ),
    gated_delta_net_row(A + "out_proj.weight", GDN + "out_proj.weight", ("hidden", "lin_v")),
)


def qwen3_5_block_spec(config: Any, transformer_impl: str, vp_stage: int | None) -> Any:
    from megatron_eaft.models.cpu_specs import gated_delta_net_block_spec

    return gated_delta_net_block_spec(config, transformer_impl, vp_stage)


def qwen3_5_mtp_layer_spec(config: Any, transformer_impl: str) -> Any:
    """The MTP layer's inner layer: the decoder's full-attention layer (its MLP included)."""
    from megatron_eaft.models.cpu_specs import attention_layer_spec, gated_delta_net_block_spec

    return attention_layer_spec(gated_delta_net_block_spec(config, transformer_impl))


# `mtp.fc` and its norms have no layer index: the rows of Megatron's MTP layer 0.
MTP_HEAD = mtp_head_rows(
    "mtp.",
    {
        "enorm": "pre_fc_norm_embedding.weight",
        "hnorm": "pre_fc_norm_hidden.weight",
        "eh_proj": "fc.weight",
        "final_layernorm": "norm.weight",
    },
    megatron_prefix=MTP_PREFIX.replace("{mtp}", "0"),
    when=has_mtp,
)


def qwen3_5_mtp_rows(mlp_rows: tuple[Param, ...]) -> tuple[Param, ...]:
    """The MTP rows of a Qwen3.5 family whose decoder MLP rows are ``mlp_rows``."""
    return (*MTP_HEAD, *mtp_layer_rows((*GATED_ATTENTION, *mlp_rows), L, "mtp.layers.{mtp}."))


def qwen3_5_layouts(causal_lm: str, vision_language: str) -> dict[str, HFLayout]:
    """The causal LM's tensors as the table names them, and the published vision-language
    checkpoints: text sub-config, `model.language_model.*` (MTP stays at the top level,
    `mtp.*`), vision tower carried through."""
    return {
        causal_lm: HFLayout(),
        vision_language: HFLayout(
            text_config="text_config",
            renames=(("model.", "model.language_model."),),
            carried=("model.visual.",),
        ),
    }


FAMILY = ModelFamily(
    name="qwen3_5",
    architectures=("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"),
    config=qwen3_5_config,
    dims=qwen3_5_dims,
    params=(
        *EMBEDDINGS,
        *GATED_ATTENTION,
        *GATED_DELTA_NET,
        *DENSE_MLP,
        *qwen3_5_mtp_rows(DENSE_MLP),
    ),
    gpt_model_kwargs=qwen3_5_gpt_model_kwargs,
    block_spec_fn=qwen3_5_block_spec,
    mtp_layers=mtp_layers,
    mtp_layer_spec_fn=qwen3_5_mtp_layer_spec,
    ignored_hf=lm_head_beside_tied_embeddings,
    hf_config_class="Qwen3_5TextConfig",
    layouts=qwen3_5_layouts("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"),
)
