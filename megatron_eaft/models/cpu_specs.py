"""Local (non-Transformer-Engine) specs for decoders Megatron-Core builds only with TE, and the
Gated DeltaNet set-up that lets them run without ``fla`` (flash-linear-attention) on CPU.

Megatron-Core 0.19.2's hybrid decoder builder
(``get_transformer_block_with_experimental_attention_variant_spec``) asserts
``transformer_impl == "transformer_engine"`` and takes its standard-attention layers from the
TE GPT spec. :func:`gated_delta_net_block_spec` runs that same builder with a local backend
provider instead: Megatron's parallel linears, the local ``DotProductAttention``, and a CPU
RMSNorm that supports what the TE norm does here (zero-centred gamma, sequence parallelism)
and fuses into the following linear under TE's parameter names
(``in_proj.layer_norm_weight``, ``linear_qkv.layer_norm_weight``,
``mlp.linear_fc1.layer_norm_weight``), so one converted checkpoint loads with either spec.

Without CUDA and without ``fla``, Gated DeltaNet runs Megatron's torch path
(``deterministic_mode``: ``F.conv1d`` and ``torch_chunk_gated_delta_rule``) with a torch
``l2norm``; that path has no packed (THD) sequences, which :class:`LocalGatedDeltaNet` refuses
with an error saying so (as it refuses the block-diagonal masks of packed rows, which a
linear-attention layer cannot honour). With CUDA none of this changes anything: the settings are empty and
the block spec is Megatron's own (local spec users on GPU get the local provider, which only
replaces what Megatron would refuse).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def torch_gated_delta_net_needed() -> bool:
    """Whether Gated DeltaNet must take Megatron's torch path (no CUDA or no ``fla``)."""
    return not torch.cuda.is_available() or not fla_available()


def gated_delta_net_runtime_settings() -> dict[str, Any]:
    """TransformerConfig fields Gated DeltaNet needs on this machine (none with CUDA + fla).

    ``deterministic_mode`` selects Megatron's torch implementations (``F.conv1d``,
    ``torch_chunk_gated_delta_rule``); elsewhere it only swaps ``F.embedding`` for indexing.
    """
    if not torch_gated_delta_net_needed():
        return {}
    return {"deterministic_mode": True}


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """fla's ``l2norm`` (and transformers' torch fallback): ``x / sqrt(sum(x^2) + eps)``."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + eps)


def enable_torch_gated_delta_net() -> None:
    """Let Megatron's Gated DeltaNet build without ``fla`` (its torch path needs only torch).

    ``_GDNBase.__init__`` refuses to build when ``fla`` did not import, and the q/k
    normalisation calls fla's ``l2norm``. Inert where ``fla`` is installed.
    """
    if fla_available():
        return
    from megatron.core.ssm.gated_delta_net import common

    common.HAVE_FLA = True
    common.l2norm = l2norm


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool
) -> torch.Tensor:
    """RMSNorm in fp32, as transformers' Qwen norms and TE compute it; ``(1 + w)`` if
    zero-centred."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    gamma = weight.float() + 1.0 if zero_centered else weight.float()
    return (normed * gamma).to(x.dtype)


def _norm_weight(config: Any, hidden_size: int) -> torch.nn.Parameter:
    if config.normalization != "RMSNorm":
        raise ValueError(
            f"the CPU spec's norm is RMSNorm only; config.normalization={config.normalization!r}"
        )
    zero_centered = config.layernorm_zero_centered_gamma
    init = torch.zeros if zero_centered else torch.ones
    weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
    # Replicated across TP; with sequence parallelism each rank sees only its tokens, so the
    # gradient must be all-reduced over TP (Megatron does that for `sequence_parallel` params).
    weight.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]
    return weight


class CpuRMSNorm(torch.nn.Module):
    """RMSNorm with zero-centred gamma and sequence parallelism (torch's Megatron wrapper
    refuses both); the parameter is ``weight``, as TE's ``TENorm`` names it."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any):
        super().__init__()
        self.eps = eps
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        self.weight = _norm_weight(config, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.zero_centered)


class HeadShardedRMSNorm(CpuRMSNorm):
    """The RMSNorm over each head of Gated DeltaNet's output (``out_norm``), replicated
    across TP while the heads it normalises are split over the TP ranks.

    Each rank's weight gradient then covers its own heads only. Megatron-Core sums such
    partial gradients over TP for q/k layernorms (by name) and for ``sequence_parallel``
    parameters under sequence parallelism, which the GDN output norm is only with SP: without
    it, TP ranks would step with different gradients (measured: 0.77 relative error at TP2).
    The weight passes an identity whose backward all-reduces over TP instead, and is not
    marked for Megatron's reduction, so it is summed once either way. Megatron calls the norm
    inside a ``torch.compile``d function (``_apply_gated_norm``); the forward stays out of the
    compiled graph, whose traced gloo all-reduce hung the TP ranks (measured).
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any):
        super().__init__(config, hidden_size, eps, **kwargs)
        self.weight.sequence_parallel = False  # type: ignore[attr-defined]

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        weight = self.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            weight = copy_to_tensor_model_parallel_region(weight)
        return rms_norm(x, weight, self.eps, self.zero_centered)


def _column_parallel_linear() -> type:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    return ColumnParallelLinear


class CpuLayerNormColumnParallelLinear(_column_parallel_linear()):  # type: ignore[misc]
    """``ColumnParallelLinear`` with its pre-norm fused in, as TE's
    ``TELayerNormColumnParallelLinear``: the norm's parameter is ``layer_norm_weight``.

    The norm runs on this rank's input before the linear's all-gather (sequence parallel)
    or before its TP copy (whose backward all-reduces the input gradient), so the norm's
    gradient is complete without SP and all-reduced by Megatron with SP. "Norm" is in the
    class name on purpose: Megatron-Bridge treats modules so named as TP-replicated.
    """

    def __init__(self, input_size: int, output_size: int, *args: Any, **kwargs: Any):
        super().__init__(input_size, output_size, *args, **kwargs)
        config = kwargs["config"]
        self.norm_eps = config.layernorm_epsilon
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        self.layer_norm_weight = _norm_weight(config, input_size)

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any):
        normed = rms_norm(input_, self.layer_norm_weight, self.norm_eps, self.zero_centered)
        return super().forward(normed, *args, **kwargs)


def _gated_delta_net() -> type:
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    return GatedDeltaNet


def _is_plain_causal(mask: torch.Tensor) -> bool:
    """Whether a Megatron attention mask ([b, 1, s, s], True = masked) is only causal."""
    seq = mask.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).triu(1)
    return bool((mask.bool() == causal).all())


class LocalGatedDeltaNet(_gated_delta_net()):  # type: ignore[misc]
    """Megatron's ``GatedDeltaNet`` for the local spec, refusing inputs it would get wrong.

    A linear-attention layer has no attention mask: a packed row's block-diagonal mask (how
    the local spec separates packed samples) would be ignored and each sample's recurrent
    state would run into the next. Packed (THD) sequences need ``fla``, which Megatron's torch
    path (CPU) does not replace. Both are refused with the reason.
    """

    def forward(self, hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any):
        packed = kwargs.get("packed_seq_params")
        if (
            packed is not None
            and getattr(packed, "qkv_format", None) == "thd"
            and not fla_available()
        ):
            raise ValueError(
                "packed (THD) sequences through Gated DeltaNet layers need fla "
                "(flash-linear-attention) on a GPU; without it (CPU) train on unpacked, padded "
                "rows (a pad dataset)"
            )
        if attention_mask is not None and not _is_plain_causal(attention_mask):
            raise ValueError(
                "Gated DeltaNet layers cannot honour a block-diagonal attention mask (packed "
                "rows): each sample's recurrent state would run into the next. Use unpacked, "
                "padded rows (a pad dataset), or Transformer Engine with fla (packed rows then "
                "go as THD sequences)"
            )
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


def _local_backend_provider() -> Any:
    from megatron.core.models.backends import LocalSpecProvider

    class LocalFusedNormSpecProvider(LocalSpecProvider):
        """Megatron's local provider, with the pre-norms fused into the following linear
        (as TE does, so checkpoint keys match) and the CPU RMSNorm everywhere else."""

        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self) -> type:
            return CpuLayerNormColumnParallelLinear

        def layer_norm(
            self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False
        ) -> Any:
            return CpuRMSNorm

    return LocalFusedNormSpecProvider()


def local_self_attention_spec(config: Any, backend: Any = None) -> Any:
    """Standard attention of a hybrid decoder, local modules, TE's checkpoint keys."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    if config.multi_latent_attention:
        raise ValueError("the local hybrid-decoder spec has no multi-latent attention")
    qk_norm = CpuRMSNorm if config.qk_layernorm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=CpuLayerNormColumnParallelLinear,
            core_attention=DotProductAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
        metainfo={"fuse_input_layernorm": True},
    )


@contextlib.contextmanager
def _local_backend(variant_specs: Any) -> Iterator[None]:
    """Megatron's hybrid builder with the local provider, for the duration of one call."""
    saved = (
        variant_specs._get_backend_spec_provider,
        variant_specs._get_self_attention_module_spec,
    )
    provider = _local_backend_provider()
    variant_specs._get_backend_spec_provider = lambda config: provider
    variant_specs._get_self_attention_module_spec = local_self_attention_spec
    try:
        yield
    finally:
        variant_specs._get_backend_spec_provider, variant_specs._get_self_attention_module_spec = (
            saved
        )


def gated_delta_net_block_spec(
    config: Any, transformer_impl: str, vp_stage: int | None = None
) -> Any:
    """This pipeline stage's decoder block spec of a Gated-DeltaNet / attention hybrid.

    Megatron's ``get_transformer_block_with_experimental_attention_variant_spec`` (layer
    pattern from ``linear_attention_freq`` and ``moe_layer_freq``), with Transformer Engine or
    with the local provider above.
    """
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as variant
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    if torch_gated_delta_net_needed():
        enable_torch_gated_delta_net()
    if transformer_impl == "transformer_engine":
        if not variant.HAVE_TE:
            raise RuntimeError(
                "transformer_impl='transformer_engine' needs Transformer Engine, which is not "
                "importable here; use transformer_impl='local'"
            )
        return variant.get_transformer_block_with_experimental_attention_variant_spec(
            config, vp_stage=vp_stage
        )
    with _local_backend(variant):
        block = variant.get_transformer_block_with_experimental_attention_variant_spec(
            config, vp_stage=vp_stage
        )
    for layer in block.layer_specs:
        attention = layer.submodules.self_attention
        if attention.module is GatedDeltaNet:
            attention.module = LocalGatedDeltaNet
            attention.submodules.out_norm = HeadShardedRMSNorm
    return block


# -- Multi-latent attention (GLM-4.7-Flash) ----------------------------------------------------


def _dot_product_attention() -> type:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


class LocalMLADotProductAttention(_dot_product_attention()):  # type: ignore[misc]
    """The local ``DotProductAttention`` for multi-latent attention.

    Megatron's MLA passes ``k_channels`` / ``v_channels`` (query/key and value head sizes
    differ), which the local class refuses; its output is heads x value head size, and its
    ``view`` calls need the contiguous q / k / v the MLA split does not give.
    """

    def __init__(
        self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            heads = self.config.num_attention_heads
            self.hidden_size_per_partition = v_channels * heads // self.tp_group.size()

    def forward(self, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any):
        return super().forward(
            query.contiguous(), key.contiguous(), value.contiguous(), *args, **kwargs
        )


def _mla_self_attention() -> type:
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    return MLASelfAttention


class LocalMLASelfAttention(_mla_self_attention()):  # type: ignore[misc]
    """Megatron's ``MLASelfAttention`` with column-parallel (local) down projections whose
    backward is complete at TP > 1.

    With TP-sharded down projections Megatron gathers ``[kv latent; rope key]`` over TP and
    lets the gather's backward keep this rank's columns of this rank's gradient. The rope key
    is shared by every head, and each rank holds only some heads, so its gradient there is a
    partial sum: the other ranks' shares were dropped (measured at TP2: 1e-2 relative error in
    the down projections, the norms before them and the embedding). Here the down projections'
    outputs are gathered in full, the rope key's gradient summed over TP, and the result
    handed on as the replicated (Transformer Engine, "duplicated") down projection gives it:
    the whole sequence, or this rank's part of it under sequence parallelism, where Megatron's
    own gather of the rope key then sums its gradient.
    """

    def _qkv_down_projection(self, hidden_states: torch.Tensor):
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_tensor_model_parallel_region,
            scatter_to_sequence_parallel_region,
        )

        config = self.config
        q_compressed, kv_combined = super()._qkv_down_projection(hidden_states)
        latent = config.kv_lora_rank + config.qk_pos_emb_head_dim
        if kv_combined.size(-1) == latent:  # TP1: nothing is split
            return q_compressed, kv_combined
        kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=self.tp_group)
        if config.sequence_parallel:
            kv_combined = scatter_to_sequence_parallel_region(kv_combined, group=self.tp_group)
        else:
            kv_latent, rope_key = torch.split(
                kv_combined, [config.kv_lora_rank, config.qk_pos_emb_head_dim], dim=-1
            )
            rope_key = copy_to_tensor_model_parallel_region(rope_key, group=self.tp_group)
            kv_combined = torch.cat([kv_latent, rope_key], dim=-1)
        return q_compressed, kv_combined


def norm_with_eps(norm: type, eps: float) -> type:
    """``norm`` built with ``eps`` whatever eps its caller passes (MLA passes
    ``layernorm_epsilon`` to its latent norms; a model may use another)."""

    class FixedEpsNorm:
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            kwargs["eps"] = eps
            return norm(*args, **kwargs)

    FixedEpsNorm.__name__ = FixedEpsNorm.__qualname__ = f"{norm.__name__}Eps{eps:g}"
    return FixedEpsNorm


# The latent norms are separate modules here (their eps is not layernorm_epsilon); saved under
# the keys of Transformer Engine's fused norm+linear up projections, as Megatron's TE spec has.
MLA_LATENT_NORM_KEYS = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}


def mla_layer_spec(config: Any, transformer_impl: str, moe: bool, latent_norm_eps: float) -> Any:
    """A decoder layer with multi-latent attention, dense or MoE, local or Transformer Engine.

    Megatron's own MLA specs give the latent norms ``layernorm_epsilon`` and (local spec)
    checkpoint keys of their own; this one takes ``latent_norm_eps`` and keeps one set of keys
    for both implementations: ``input_layernorm.weight``, the latent norms as
    ``linear_{q,kv}_up_proj.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight`` on dense
    layers and ``pre_mlp_layernorm.weight`` on MoE layers.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import (
        MLASelfAttention,
        MLASelfAttentionSubmodules,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
        down_projection = backend.linear()  # replicated across TP ("duplicated")
        core_attention = backend.core_attention()
        attention = MLASelfAttention
    else:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear

        backend = _local_backend_provider()
        down_projection = ColumnParallelLinear  # as Megatron's local MLA spec
        core_attention = LocalMLADotProductAttention
        attention = LocalMLASelfAttention
    norm = backend.layer_norm(rms_norm=True)
    latent_norm = norm_with_eps(backend.layer_norm(rms_norm=True, for_qk=True), latent_norm_eps)
    mlp = get_mlp_module_spec_for_backend(
        backend=backend,
        num_experts=config.num_moe_experts if moe else None,
        moe_grouped_gemm=bool(config.moe_grouped_gemm) if moe else False,
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=attention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=MLASelfAttentionSubmodules(
                    linear_q_proj=backend.column_parallel_linear(),
                    linear_q_down_proj=down_projection,
                    linear_q_up_proj=backend.column_parallel_linear(),
                    linear_kv_down_proj=down_projection,
                    linear_kv_up_proj=backend.column_parallel_linear(),
                    core_attention=core_attention,
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=latent_norm,
                    kv_layernorm=latent_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            # Dense layers fuse the pre-MLP norm into fc1 (both backends fuse here).
            pre_mlp_layernorm=norm if moe else IdentityOp,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(MLA_LATENT_NORM_KEYS),
        ),
    )


def mla_decoder_block_spec(
    config: Any, transformer_impl: str, vp_stage: int | None, latent_norm_eps: float
) -> Any:
    """This pipeline stage's decoder block of MLA layers, MoE where ``moe_layer_freq`` says."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if transformer_impl == "transformer_engine":
        from megatron.core.models.gpt import gpt_layer_specs

        if not gpt_layer_specs.HAVE_TE:
            raise RuntimeError(
                "transformer_impl='transformer_engine' needs Transformer Engine, which is not "
                "importable here; use transformer_impl='local'"
            )
    pattern = config.moe_layer_freq
    if not isinstance(pattern, list) or len(pattern) != config.num_layers:
        raise ValueError(f"moe_layer_freq must list each of {config.num_layers} layers: {pattern}")
    specs = {
        moe: mla_layer_spec(config, transformer_impl, moe, latent_norm_eps)
        for moe in sorted(set(map(bool, pattern)))
    }
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    final_norm = specs[bool(pattern[0])].submodules.input_layernorm  # the backend's RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[specs[bool(m)] for m in pattern[offset : offset + count]],
        layer_norm=final_norm,
    )


# -- Multi-token prediction ---------------------------------------------------------------------


def mtp_block_spec(
    config: Any, layer_spec: Any, transformer_impl: str, vp_stage: int | None = None
) -> Any:
    """Megatron's MTP block spec around ``layer_spec`` (the MTP layer's inner decoder layer),
    with Transformer Engine's modules or the local provider's (its CPU RMSNorm for ``enorm``,
    ``hnorm`` and ``final_layernorm``); None on a pipeline stage that builds no MTP layer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend

    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
    else:
        backend = _local_backend_provider()
    return get_gpt_mtp_block_spec_for_backend(config, layer_spec, backend, vp_stage=vp_stage)


def attention_layer_spec(block: Any) -> Any:
    """The first standard-attention layer spec of a hybrid decoder block (Qwen3.5's MTP layer
    is a full-attention layer of its decoder's kind)."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    for layer in block.layer_specs:
        if not issubclass(layer.submodules.self_attention.module, GatedDeltaNet):
            return layer
    raise ValueError("this pipeline stage's decoder block has no full-attention layer")
