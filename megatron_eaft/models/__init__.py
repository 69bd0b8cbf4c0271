"""What a model is: families (HF config -> Megatron), layer specs, model metadata, building.

- :mod:`.family` / :mod:`.families`: the family format and one data file per HF architecture;
- :mod:`.metadata`: :class:`ModelMetadata`, the typed ``megatron_eaft_model.json``;
- :mod:`.checkpoint_dir`: the checkpoint directory layout (tracker, iteration directories);
- :mod:`.build`: one way to build the GPTModel of a checkpoint at a layout and load it;
- :mod:`.glm4_layer`: the GLM-4 sandwich-norm decoder layer.

``convert``, ``train`` and ``diagnostics`` use this package and not each other.
"""

from megatron_eaft.models.build import (
    DTYPES,
    LayoutError,
    ParallelLayout,
    build_gpt_model,
    build_model,
    check_layout,
    load_checkpoint_into_model,
    load_model_weights,
    resolve_transformer_impl,
)
from megatron_eaft.models.checkpoint_dir import MegatronCheckpointError
from megatron_eaft.models.families import all_families, family_for_hf_config, get_family
from megatron_eaft.models.metadata import ModelMetadata

__all__ = [
    "DTYPES",
    "LayoutError",
    "MegatronCheckpointError",
    "ModelMetadata",
    "ParallelLayout",
    "all_families",
    "build_gpt_model",
    "build_model",
    "check_layout",
    "family_for_hf_config",
    "get_family",
    "load_checkpoint_into_model",
    "load_model_weights",
    "resolve_transformer_impl",
]
