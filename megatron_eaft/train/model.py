"""The model the trainer fine-tunes: its description (HF config + family) and the GPTModel.

Either a checkpoint directory (``megatron_eaft_model.json`` written by ``convert import`` or by
the trainer itself), an HF ``config.json`` or a preset built in code describes the model;
:mod:`megatron_eaft.models` turns that into Megatron's TransformerConfig and layer spec, so
there is one mapping from an HF config to Megatron, shared with the converter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megatron_eaft.models import (
    ModelMetadata,
    ParallelLayout,
    resolve_transformer_impl,
)
from megatron_eaft.models import (
    build_model as build_layout_model,
)
from megatron_eaft.models.metadata import read_json_object
from megatron_eaft.train.config import FinetuneConfig

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel


def tiny_qwen3_hf_config(**overrides: Any) -> dict[str, Any]:
    """A Qwen3-style HF config small enough for CPU tests: 4 layers, hidden 64, vocab 512.

    It has Qwen3's structure (GQA, per-head q/k RMSNorm, head_dim set on its own, SwiGLU,
    RoPE base 1e6, untied embeddings) so it goes through the same family preset as a real
    Qwen3 checkpoint, and 4 layers split over 2 pipeline stages.
    """
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }
    config.update(overrides)
    return config


PRESETS = {"tiny-qwen3": tiny_qwen3_hf_config}


def model_description(config: FinetuneConfig) -> ModelMetadata:
    """The metadata the model is built from (the checkpoint's, the HF config's, the preset's)."""
    if config.model.checkpoint is not None:
        return ModelMetadata.read(config.model.checkpoint)
    if config.model.hf_config is not None:
        hf_config = read_json_object(config.model.hf_config)
        source = config.model.hf_config
    else:
        hf_config = PRESETS[config.model.preset]()
        source = f"preset:{config.model.preset}"
    return ModelMetadata.for_hf_config(
        hf_config,
        dtype=config.model.dtype,
        transformer_impl=resolve_transformer_impl(config.model.transformer_impl),
        source=source,
    )


def parallel_layout(config: FinetuneConfig) -> ParallelLayout:
    parallel = config.parallel
    return ParallelLayout(
        tensor=parallel.tensor,
        pipeline=parallel.pipeline,
        expert=parallel.expert,
        context=parallel.context,
        sequence_parallel=parallel.sequence_parallel,
        first_stage_layers=parallel.first_stage_layers,
        last_stage_layers=parallel.last_stage_layers,
    )


def build_model(
    config: FinetuneConfig,
    description: ModelMetadata,
    *,
    transformer_impl: str,
    initialize_weights: bool,
) -> GPTModel:
    """The GPTModel chunk of this pipeline stage, under the initialised parallel state.

    ``calculate_per_token_loss`` makes the schedule scale gradients by 1 / (loss tokens of the
    whole global batch) rather than averaging per micro-batch, so a step is the same token
    mean at any micro-batch count and DP size.
    """
    return build_layout_model(
        description,
        parallel_layout(config),
        dtype=config.model.dtype,
        transformer_impl=transformer_impl,
        initialize_weights=initialize_weights,
        calculate_per_token_loss=True,
    )


def description_for_save(description: ModelMetadata, config: FinetuneConfig) -> ModelMetadata:
    """What the trainer writes beside its checkpoints, so they load and export like converted ones."""
    return description.replace(dtype=config.model.dtype)
