"""Building the Megatron-Core GPTModel a checkpoint describes, at any TP/PP/EP layout.

One path serves ``finetune``, ``diagnose`` and ``convert verify``: the checkpoint's
:class:`~megatron_eaft.models.metadata.ModelMetadata` + a :class:`ParallelLayout` ->
``build_model`` -> ``load_model_weights``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_eaft.models.checkpoint_dir import (
    BRIDGE_TRAINING_STATE_KEY,
    TRAINING_STATE_KEY,
    Iteration,
    MegatronCheckpointError,
    checkpoint_dir,
)
from megatron_eaft.models.families import family_for_hf_config
from megatron_eaft.models.family import DEFAULT_VOCAB_DIVISOR
from megatron_eaft.models.family import padded_vocab_size as megatron_padded_vocab
from megatron_eaft.models.metadata import ModelMetadata

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """How the model is split: the sizes given to ``initialize_model_parallel``."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    context: int = 1
    sequence_parallel: bool = False
    # Layers of the first / last pipeline stage when the others share the rest evenly
    # (Megatron's num_layers_in_{first,last}_pipeline_stage); None: an even split.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def pipeline_config(self) -> dict[str, int]:
        """The TransformerConfig fields of an uneven pipeline split (none for an even one)."""
        fields = {
            "num_layers_in_first_pipeline_stage": self.first_stage_layers,
            "num_layers_in_last_pipeline_stage": self.last_stage_layers,
        }
        return {name: value for name, value in fields.items() if value is not None}


class LayoutError(ValueError):
    """A parallel layout the model cannot be split by; ``option`` names the size at fault."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


# (layout size, TransformerConfig field, what the field counts): Megatron splits each such
# count evenly, and asserts deep inside model construction when it cannot.
_DIVISIBILITY = (
    ("tensor", "num_attention_heads", "attention heads"),
    ("tensor", "num_query_groups", "key/value heads (query groups; or a divisor of TP)"),
    ("tensor", "ffn_hidden_size", "MLP hidden size"),
    ("tensor", "moe_ffn_hidden_size", "expert MLP hidden size"),
    ("tensor", "linear_num_key_heads", "linear-attention key heads"),
    ("tensor", "linear_num_value_heads", "linear-attention value heads"),
    ("expert", "num_moe_experts", "experts"),
)


def _check_pipeline_split(family: str, layers: int, layout: ParallelLayout) -> None:
    """Megatron's rule: the first / last stage take the layers given, every other stage an
    equal share of the rest, and every stage at least one layer."""
    ends = {"first_stage_layers": layout.first_stage_layers}
    ends["last_stage_layers"] = layout.last_stage_layers
    given = {option: count for option, count in ends.items() if count is not None}
    if given and layout.pipeline <= 1:
        raise LayoutError(next(iter(given)), "needs pipeline parallel size > 1")
    for option, count in given.items():
        if count < 1:
            raise LayoutError(option, f"must be >= 1, got {count}")
    rest = layers - sum(given.values())
    middle = layout.pipeline - len(given)
    if middle == 0 and rest == 0:
        return
    if middle > 0 and rest > 0 and rest % middle == 0:
        return
    if not given:
        raise LayoutError(
            "pipeline",
            f"pipeline parallel size {layout.pipeline} does not divide the {layers} layers of "
            f"this {family} model (num_layers); the first / last stage can have their own "
            "counts (finetune: parallel.first_stage_layers / last_stage_layers)",
        )
    split = ", ".join(f"{option} {count}" for option, count in given.items())
    raise LayoutError(
        next(iter(given)),
        f"{split} leave {rest} of the {layers} layers of this {family} model for "
        f"{middle} other pipeline stage(s): each needs an equal share of at least one layer",
    )


def check_layout(metadata: ModelMetadata, layout: ParallelLayout) -> None:
    """Refuse, naming the size and the model's count, a layout Megatron could not build.

    Pure Python (no Megatron import), so commands can check before starting ranks.
    """
    config = metadata.model_family.transformer_config_kwargs(metadata.hf_config)
    for option, field, what in _DIVISIBILITY:
        size = getattr(layout, option)
        count = config.get(field)
        if field == "num_query_groups" and count is None:
            count = config.get("num_attention_heads")
        if count is None or size <= 1:
            continue
        # Megatron replicates key/value heads when there are fewer than TP ranks.
        replicable = field == "num_query_groups" and size % count == 0
        if count % size and not replicable:
            raise LayoutError(
                option,
                f"{option} parallel size {size} does not divide the {count} {what} of this "
                f"{metadata.family} model ({field})",
            )
    _check_pipeline_split(metadata.family, config["num_layers"], layout)
    if layout.expert > 1 and not config.get("num_moe_experts"):
        raise LayoutError(
            "expert",
            f"expert parallel size {layout.expert}: this {metadata.family} model has no experts",
        )


def resolve_transformer_impl(requested: str) -> str:
    """``auto``: Transformer Engine where it can run (installed and a GPU), else local."""
    if requested != "auto":
        return requested
    from megatron.core.models.gpt import gpt_layer_specs

    if gpt_layer_specs.HAVE_TE and torch.cuda.is_available():
        return "transformer_engine"
    return "local"


def build_gpt_model(
    hf_config: Mapping[str, Any],
    config: TransformerConfig,
    *,
    transformer_impl: str = "local",
    pre_process: bool = True,
    post_process: bool = True,
    padded_vocab_size: int | None = None,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    vp_stage: int | None = None,
) -> GPTModel:
    """GPTModel for ``hf_config`` with ``config`` (from ``family.transformer_config``).

    The vocab is padded Megatron-LM's way (a multiple of ``make_vocab_size_divisible_by * tp``)
    unless ``padded_vocab_size`` is given; a converted checkpoint loads at any padding, since
    Megatron reads the embedding and output rows that overlap. Rotary base / percent and tied
    embeddings come from the family. Padded vocab rows produce logits the loss must ignore
    (ids >= the HF ``vocab_size`` never occur as labels).
    """
    from megatron.core.models.gpt import GPTModel

    family = family_for_hf_config(hf_config)
    hf = family.hf(hf_config)
    vocab = family.dims(hf).vocab
    if padded_vocab_size is None:
        padded = megatron_padded_vocab(
            vocab, make_vocab_size_divisible_by, config.tensor_model_parallel_size
        )
    else:
        padded = padded_vocab_size
    if padded < vocab:
        raise ValueError(f"padded_vocab_size {padded} is smaller than vocab_size {vocab}")
    if padded % config.tensor_model_parallel_size:
        raise ValueError(
            f"padded_vocab_size {padded} is not divisible by TP={config.tensor_model_parallel_size}"
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=family.decoder_spec(config, transformer_impl, vp_stage),
        mtp_block_spec=family.mtp_block_spec(config, transformer_impl, vp_stage),
        vocab_size=padded,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **family.gpt_model_kwargs(hf),
    )


def _moe_settings(metadata: ModelMetadata, transformer_impl: str) -> dict[str, Any]:
    if not metadata.model_family.transformer_config_kwargs(metadata.hf_config).get(
        "num_moe_experts"
    ):
        return {}
    return {
        # all-to-all is the expert-parallel dispatcher of choice (on CPU too: cpu_runtime hands
        # it its split sizes as it has them on a GPU).
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": transformer_impl == "transformer_engine",
    }


def build_model(
    metadata: ModelMetadata,
    layout: ParallelLayout,
    *,
    dtype: torch.dtype | str | None = None,
    transformer_impl: str | None = None,
    initialize_weights: bool = False,
    **config_overrides: Any,
) -> GPTModel:
    """The GPTModel chunk of this pipeline stage, under the initialised parallel state.

    ``dtype`` and ``transformer_impl`` default to the checkpoint's; ``config_overrides`` are
    further ``TransformerConfig`` fields (``calculate_per_token_loss``, ...). Weights are
    left uninitialised unless ``initialize_weights``: they are about to be loaded.
    """
    from megatron.core import parallel_state

    dtype = DTYPES[dtype or metadata.dtype] if not isinstance(dtype, torch.dtype) else dtype
    impl = resolve_transformer_impl(transformer_impl or metadata.transformer_impl)
    config = metadata.model_family.transformer_config(
        metadata.hf_config,
        params_dtype=dtype,
        tp=layout.tensor,
        pp=layout.pipeline,
        ep=layout.expert,
        variants=metadata.hf_variants,
        context_parallel_size=layout.context,
        sequence_parallel=layout.sequence_parallel,
        **layout.pipeline_config(),
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=initialize_weights,
        **{**_moe_settings(metadata, impl), **config_overrides},
    )
    return build_gpt_model(
        metadata.hf_config,
        config,
        transformer_impl=impl,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        padded_vocab_size=metadata.padded_vocab_for_tp(layout.tensor),
    )


def load_model_state(model: Any, state: dict[str, Any], path: Path, *, strict: bool) -> None:
    """``model.load_state_dict`` that raises, naming ``path``, when a parameter is left unset."""
    result = model.load_state_dict(state, strict=strict)
    unset = [k for k in result.missing_keys if "_extra_state" not in k]
    if unset or result.unexpected_keys:
        raise MegatronCheckpointError(
            f"{path}: loading left parameters unset {unset} / unknown {result.unexpected_keys}"
        )


def load_checkpoint_into_model(
    model: Any,
    megatron_ckpt_dir: str | os.PathLike,
    *,
    iteration: Iteration | None = None,
    allow_missing_extra_state: bool = True,
) -> None:
    """Load a converted checkpoint into a built ``GPTModel`` (any TP/PP/EP layout).

    Every tensor the model asks for must be in the checkpoint and every tensor in the
    checkpoint must be asked for by some rank. Transformer Engine modules can ask for
    ``_extra_state`` entries (FP8 metadata) a converted checkpoint does not hold; with
    ``allow_missing_extra_state`` those, and only those, are skipped and keep fresh values.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = checkpoint_dir(megatron_ckpt_dir, iteration)
    # Megatron's words: "unexpected" = asked for by the model, absent from the checkpoint;
    # "missing" = in the checkpoint, asked for by no rank.
    loaded, in_checkpoint_only, in_model_only = dist_checkpointing.load(
        model.sharded_state_dict(), str(path), strict=StrictHandling.RETURN_ALL
    )
    absent = sorted(
        k for k in in_model_only if not (allow_missing_extra_state and "_extra_state" in k)
    )
    unused = sorted(k for k in in_checkpoint_only if "_extra_state" not in k)
    if absent or unused:
        raise MegatronCheckpointError(
            f"{path} does not match the model: missing from the checkpoint {absent}, "
            f"not used by the model {unused}"
        )
    load_model_state(model, loaded, path, strict=True)


def is_training_checkpoint(path: Path) -> bool:
    """Whether the torch_dist directory was saved by a trainer, ours or Megatron-Bridge's
    (weights under "model" next to optimizer state and training counters)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    return TRAINING_STATE_KEY in common or BRIDGE_TRAINING_STATE_KEY in common


def load_model_weights(
    model: Any, root: str | os.PathLike, *, iteration: Iteration | None = None
) -> Path:
    """Only the weights of a checkpoint under ``root`` (default: the tracker's), at this
    run's layout.

    Converted checkpoints go through the converter's loader; fine-tuned ones (which also hold
    optimizer state) through Megatron's loader with the model's keys only, every one of which
    must be in the checkpoint.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = checkpoint_dir(root, iteration)
    if not is_training_checkpoint(path):
        load_checkpoint_into_model(model, root, iteration=iteration)
        return path
    loaded, _, absent = dist_checkpointing.load(
        {"model": model.sharded_state_dict()}, str(path), strict=StrictHandling.RETURN_ALL
    )
    absent = sorted(k for k in absent if "_extra_state" not in k)
    if absent:
        raise MegatronCheckpointError(f"{path} lacks model tensors {absent}")
    load_model_state(model, loaded["model"], path, strict=False)
    return path
