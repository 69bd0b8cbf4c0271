"""The model the trainer fine-tunes: its description (HF config + family) and the GPTModel.

Either a checkpoint directory (``megatron_eaft_model.json`` written by ``convert import`` or by
the trainer itself) or a preset built in code describes the model; the family preset of
:mod:`megatron_eaft.convert` turns that into Megatron's TransformerConfig and layer spec, so
there is one mapping from an HF config to Megatron, shared with the converter.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_eaft.convert.checkpoint import model_metadata, read_model_metadata
from megatron_eaft.convert.families import family_for_hf_config
from megatron_eaft.convert.family import DEFAULT_VOCAB_DIVISOR, padded_vocab_size
from megatron_eaft.convert.hf_io import read_json
from megatron_eaft.convert.model import build_gpt_model
from megatron_eaft.megatron import cpu_runtime
from megatron_eaft.train.config import FinetuneConfig

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def resolve_transformer_impl(requested: str) -> str:
    if requested != "auto":
        return requested
    from megatron.core.models.gpt import gpt_layer_specs

    if gpt_layer_specs.HAVE_TE and cpu_runtime.cuda_available():
        return "transformer_engine"
    return "local"


def model_description(config: FinetuneConfig) -> dict[str, Any]:
    """The metadata the model is built from (the checkpoint's, the HF config's, the preset's)."""
    if config.model.checkpoint is not None:
        return read_model_metadata(config.model.checkpoint)
    if config.model.hf_config is not None:
        hf_config = read_json(Path(config.model.hf_config))
        source = config.model.hf_config
    else:
        hf_config = PRESETS[config.model.preset]()
        source = f"preset:{config.model.preset}"
    family = family_for_hf_config(hf_config)
    return model_metadata(
        hf_config=hf_config,
        family=family.name,
        padded_vocab_size=padded_vocab_size(hf_config["vocab_size"], DEFAULT_VOCAB_DIVISOR),
        make_vocab_size_divisible_by=DEFAULT_VOCAB_DIVISOR,
        dtype=config.model.dtype,
        transformer_impl=resolve_transformer_impl(config.model.transformer_impl),
        source=source,
    )


def padded_vocab_for_layout(description: dict[str, Any], tensor_parallel: int) -> int:
    """The stored padded vocab when TP divides it, else Megatron-LM's padding for this TP."""
    padded = int(description["padded_vocab_size"])
    if padded % tensor_parallel == 0:
        return padded
    vocab = int(description["hf_config"]["vocab_size"])
    return padded_vocab_size(
        vocab, int(description["make_vocab_size_divisible_by"]), tensor_parallel
    )


def build_model(
    config: FinetuneConfig,
    description: dict[str, Any],
    *,
    transformer_impl: str,
    initialize_weights: bool,
) -> GPTModel:
    """The GPTModel chunk of this pipeline stage, under the initialised parallel state.

    ``calculate_per_token_loss`` makes the schedule scale gradients by 1 / (loss tokens of the
    whole global batch) rather than averaging per micro-batch, so a step is the same token
    mean at any micro-batch count and DP size.
    """
    from megatron.core import parallel_state

    hf_config = description["hf_config"]
    family = family_for_hf_config(hf_config)
    parallel = config.parallel
    moe = {}
    if family.transformer_config_kwargs(hf_config).get("num_moe_experts"):
        moe = {
            # all-to-all is the expert-parallel dispatcher of choice on GPUs; gloo has no
            # all_to_all, so CPU runs gather instead.
            "moe_token_dispatcher_type": "alltoall"
            if cpu_runtime.cuda_available()
            else "allgather",
            "moe_grouped_gemm": transformer_impl == "transformer_engine",
        }
    transformer_config = family.transformer_config(
        hf_config,
        params_dtype=DTYPES[config.model.dtype],
        tp=parallel.tensor,
        pp=parallel.pipeline,
        ep=parallel.expert,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel,
        calculate_per_token_loss=True,
        use_cpu_initialization=not cpu_runtime.cuda_available(),
        perform_initialization=initialize_weights,
        **moe,
    )
    return build_gpt_model(
        hf_config,
        transformer_config,
        transformer_impl=transformer_impl,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        padded_vocab_size=padded_vocab_for_layout(description, parallel.tensor),
    )


def description_for_save(description: dict[str, Any], config: FinetuneConfig) -> dict[str, Any]:
    """What the trainer writes beside its checkpoints, so they load and export like converted ones."""
    return {**description, "dtype": config.model.dtype}
