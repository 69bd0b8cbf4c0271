"""Dense GLM-4 / GLM-4-0414 (`Glm4ForCausalLM`) layer for Megatron-Core.

GLM-4 is a pre-norm decoder with two extra "sandwich" RMSNorms per layer: one on the
attention output and one on the MLP output, each applied *before* its residual add::

    h = x + post_self_attn_layernorm(attention(input_layernorm(x)))
    y = h + post_mlp_layernorm(mlp(pre_mlp_layernorm(h)))

Upstream Megatron-Core has no such option. `Glm4TransformerLayer` adds the two norms to
`TransformerLayer` by normalising the branch output inside its bias-dropout-add step, so
everything else (recompute, offloading, sharded checkpoints, inference paths) stays
upstream's. The norms are ordinary child modules, so `sharded_state_dict` stores them like
`input_layernorm`: replicated across TP, stacked over layers under
`decoder.layers.post_self_attn_layernorm.weight` / `decoder.layers.post_mlp_layernorm.weight`.

The rest of GLM-4 maps onto existing TransformerConfig options (qkv bias, SwiGLU with the
fused [gate; up] fc1, RMSNorm, interleaved partial RoPE via `rotary_interleaved=True` and
GPTModel's `rotary_percent=0.5`; Megatron's unfused interleaved RoPE equals transformers'
GLM-4 rotary exactly, see tests/glm4/test_glm4_layer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from torch import Tensor, nn

TransformerImpl = Literal["local", "transformer_engine"]
TRANSFORMER_IMPLS: tuple[TransformerImpl, ...] = ("local", "transformer_engine")

# Transformer Engine classes are named, not imported: without TE, Megatron binds these names to
# placeholders, and a spec holding (module path, class name) can still be built and inspected
# on CPU; the class is resolved by `build_module` when a GPU run instantiates the layer.
TE_EXTENSION_MODULE = "megatron.core.extensions.transformer_engine"

# Megatron's local spec stores its separate norms under the Transformer Engine names, so a
# checkpoint written with either spec loads into the other. Ours does the same.
_LOCAL_TO_TE_CHECKPOINT_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}

BranchOutput = tuple[Tensor, Tensor | None]


@dataclass
class Glm4TransformerLayerSubmodules(TransformerLayerSubmodules):
    """`TransformerLayerSubmodules` plus GLM-4's norms on the attention and MLP outputs."""

    post_self_attn_layernorm: Any = IdentityOp
    post_mlp_layernorm: Any = IdentityOp


class Glm4TransformerLayer(TransformerLayer):
    """`TransformerLayer` with GLM-4's sandwich norms before each residual add."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Glm4TransformerLayerSubmodules,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if getattr(config, "inference_fuse_tp_communication", False):
            # That path folds the residual add into linear_proj / linear_fc2 and skips the
            # bias-dropout-add step where the sandwich norms run.
            raise ValueError(
                "Glm4TransformerLayer does not support inference_fuse_tp_communication: "
                "the GLM-4 post-attention / post-MLP norms would be skipped"
            )
        if config.rotary_interleaved and getattr(config, "fused_single_qkv_rope", False):
            # Megatron-Core's single-kernel QKV RoPE (apply_fused_qkv_rotary_pos_emb) is called
            # without the interleave flag and would rotate GLM-4's pairs as halves, silently.
            raise ValueError(
                "Glm4TransformerLayer: fused_single_qkv_rope ignores rotary_interleaved in "
                "Megatron-Core and would apply GLM-4's interleaved RoPE as half-split RoPE; "
                "set fused_single_qkv_rope=False (apply_rope_fusion honours interleaving)"
            )
        super().__init__(config, submodules, *args, **kwargs)
        if self.is_moe_layer:
            raise ValueError("Glm4TransformerLayer is the dense GLM-4 layer; got an MoE mlp")

        self.post_self_attn_layernorm = submodules.post_self_attn_layernorm(
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self.post_mlp_layernorm = submodules.post_mlp_layernorm(
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        # TransformerLayer calls `self.<x>_bda(training, fused)(output_with_bias, residual,
        # dropout)`; routing those calls through the norms leaves its forward untouched.
        self.self_attn_bda = partial(
            self._norm_then_residual_add, self.self_attn_bda, "post_self_attn_layernorm"
        )
        self.mlp_bda = partial(self._norm_then_residual_add, self.mlp_bda, "post_mlp_layernorm")

    def _norm_then_residual_add(
        self, bias_dropout_add: Callable, norm_name: str, training: bool, fused: bool
    ) -> Callable[[BranchOutput, Tensor, float], Tensor]:
        residual_add = bias_dropout_add(training, fused)
        norm = getattr(self, norm_name)

        def normed_residual_add(output: BranchOutput, residual: Tensor, dropout: float) -> Tensor:
            return residual_add(_normalize_branch(norm, output), residual, dropout)

        return normed_residual_add


def _normalize_branch(norm: nn.Module, output_with_bias: BranchOutput) -> BranchOutput:
    """Norm of a branch's full output: a skipped output-layer bias must be added first."""
    output, bias = output_with_bias
    if bias is not None:
        output = output + bias
    return norm(output), None


def _lazy_te(class_name: str) -> ModuleSpec:
    return ModuleSpec(module=(TE_EXTENSION_MODULE, class_name))


def glm4_layer_submodules(
    transformer_impl: TransformerImpl = "local",
) -> Glm4TransformerLayerSubmodules:
    """The GLM-4 layer's modules, without checking that Transformer Engine is installed.

    local: separate norms (torch RMSNorm via `WrappedTorchNorm`, picked by
    `config.normalization`) and Megatron-Core's parallel linears. transformer_engine: the
    input / pre-MLP norms fused into `linear_qkv` / `linear_fc1` (`layer_norm_weight`), the
    sandwich norms as `TENorm` modules.
    """
    if transformer_impl == "local":
        input_norm = pre_mlp_norm = sandwich_norm = WrappedTorchNorm
        qkv_linear = fc1_linear = ColumnParallelLinear
        row_linear, core_attention = RowParallelLinear, DotProductAttention
        checkpoint_keys = dict(_LOCAL_TO_TE_CHECKPOINT_KEYS)
    elif transformer_impl == "transformer_engine":
        input_norm = pre_mlp_norm = IdentityOp
        sandwich_norm = _lazy_te("TENorm")
        qkv_linear = fc1_linear = _lazy_te("TELayerNormColumnParallelLinear")
        row_linear, core_attention = (
            _lazy_te("TERowParallelLinear"),
            _lazy_te("TEDotProductAttention"),
        )
        checkpoint_keys = {}
    else:
        raise ValueError(
            f"unknown transformer_impl {transformer_impl!r}; expected one of {TRANSFORMER_IMPLS}"
        )
    return Glm4TransformerLayerSubmodules(
        input_layernorm=input_norm,
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=qkv_linear,
                core_attention=core_attention,
                linear_proj=row_linear,
                q_layernorm=IdentityOp,
                k_layernorm=IdentityOp,
            ),
        ),
        self_attn_bda=get_bias_dropout_add,
        post_self_attn_layernorm=sandwich_norm,
        pre_mlp_layernorm=pre_mlp_norm,
        mlp=partial(
            MLP.as_mlp_submodule,
            submodules=MLPSubmodules(linear_fc1=fc1_linear, linear_fc2=row_linear),
        ),
        mlp_bda=get_bias_dropout_add,
        post_mlp_layernorm=sandwich_norm,
        sharded_state_dict_keys_map=checkpoint_keys,
    )


def glm4_layer_spec(transformer_impl: TransformerImpl = "local") -> ModuleSpec:
    """Layer spec for `GPTModel(transformer_layer_spec=...)` for dense GLM-4.

    Pair it with a TransformerConfig with `normalization="RMSNorm"`, `gated_linear_unit=True`,
    `activation_func=F.silu`, `add_bias_linear=False`, `add_qkv_bias=True`,
    `rotary_interleaved=True`, and GPTModel's `rotary_percent=0.5` (transformers'
    `partial_rotary_factor`).
    """
    if transformer_impl == "transformer_engine" and not HAVE_TE:
        raise ImportError(
            "transformer_impl='transformer_engine' needs Transformer Engine, which does not "
            "import here; use transformer_impl='local'"
        )
    return ModuleSpec(
        module=Glm4TransformerLayer, submodules=glm4_layer_submodules(transformer_impl)
    )
