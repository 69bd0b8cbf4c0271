"""Checks of a finetune configuration that need only paths and metadata, run before any rank
imports Megatron or builds a model (which takes tens of seconds), each naming its config key.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from megatron_eaft.data.compatibility import DatasetModelMismatch, check_dataset_for_model
from megatron_eaft.data.layout import read_metadata
from megatron_eaft.models import LayoutError, ModelMetadata, check_layout
from megatron_eaft.models.checkpoint_dir import (
    RELEASE,
    MegatronCheckpointError,
    checkpoint_dir,
    read_tracker,
)
from megatron_eaft.models.family import UnsupportedConfigError
from megatron_eaft.models.metadata import read_json_object
from megatron_eaft.train.config import ConfigError, FinetuneConfig
from megatron_eaft.train.model import PRESETS, parallel_layout


def _model_metadata(config: FinetuneConfig) -> ModelMetadata:
    model = config.model
    try:
        if model.checkpoint is not None:
            metadata = ModelMetadata.read(model.checkpoint)
            checkpoint_dir(model.checkpoint)  # the tracker names an iteration that exists
            return metadata
        hf_config = (
            read_json_object(model.hf_config)
            if model.hf_config is not None
            else PRESETS[model.preset]()
        )
        return ModelMetadata.for_hf_config(
            hf_config, dtype=model.dtype, transformer_impl=model.transformer_impl
        )
    except (MegatronCheckpointError, UnsupportedConfigError) as error:
        key = "model.checkpoint" if model.checkpoint is not None else "model.hf_config"
        raise ConfigError(key, str(error)) from None


def _check_dataset(config: FinetuneConfig, key: str, path: str | None) -> None:
    if path is None:
        return
    if not Path(path).is_dir():
        raise ConfigError(key, f"{path} is not a directory (a `megatron-eaft prepare-data` output)")
    try:
        read_metadata(path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(key, str(error)) from None


def _check_save_dir(config: FinetuneConfig) -> None:
    save = config.checkpoint.save
    if save is None:
        return
    if Path(save).exists() and not Path(save).is_dir():
        raise ConfigError("checkpoint.save", f"{save} exists and is not a directory")
    base = config.model.checkpoint
    if base is not None and Path(save).resolve() == Path(base).resolve():
        raise ConfigError(
            "checkpoint.save",
            f"{save} is model.checkpoint: fine-tuned iterations would be written into the "
            "checkpoint being fine-tuned; choose another directory",
        )
    try:
        saved = read_tracker(save)
    except MegatronCheckpointError as error:
        raise ConfigError("checkpoint.save", str(error)) from None
    if saved == RELEASE:
        raise ConfigError(
            "checkpoint.save",
            f"{save} holds a converted checkpoint (its tracker says 'release'), not a "
            "fine-tuning run to resume; give it as model.checkpoint and save elsewhere",
        )
    for key, root in (("checkpoint.save", save), ("checkpoint.load", config.checkpoint.load)):
        if root is None:
            continue
        try:
            if read_tracker(root) is not None:
                checkpoint_dir(root)
        except MegatronCheckpointError as error:
            raise ConfigError(key, str(error)) from None


def _datasets(config: FinetuneConfig) -> list[tuple[str, str | None]]:
    """(key, directory) of the training data and of every evaluation set."""
    return [
        ("data.path", config.data.path),
        ("data.eval_path", config.data.eval_path),
        *((f"eval.sets.{name}", path) for name, path in config.eval.sets.items()),
    ]


def _check_moe_sequence_parallel(config: FinetuneConfig, metadata: ModelMetadata) -> None:
    """Megatron-Core's MoE layer refuses a training forward at TP > 1 without sequence
    parallelism (``moe_layer.py``), which would surface only after every rank has built and
    loaded the model."""
    parallel = config.parallel
    if parallel.tensor <= 1 or parallel.sequence_parallel:
        return
    experts = metadata.model_family.transformer_config_kwargs(metadata.hf_config).get(
        "num_moe_experts"
    )
    if experts:
        raise ConfigError(
            "parallel.sequence_parallel",
            f"this {metadata.family} model has MoE layers, which Megatron-Core trains at "
            f"parallel.tensor={parallel.tensor} only with sequence parallelism; set "
            "parallel.sequence_parallel=true (or use parallel.expert instead of tensor "
            "parallelism)",
        )


def _may_use_transformer_engine(transformer_impl: str) -> bool:
    """What ``auto`` resolves to, without importing Megatron (its layer specs decide there)."""
    if transformer_impl != "auto":
        return transformer_impl == "transformer_engine"
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def _check_gated_delta_net_sequence_parallel(
    config: FinetuneConfig, metadata: ModelMetadata
) -> None:
    """Gated DeltaNet's output norm is replicated across TP while the heads it normalises are
    split: Megatron-Core 0.19 sums its gradient over TP only for ``sequence_parallel``
    parameters under sequence parallelism. Without SP the TP ranks' copies drift apart (our
    local spec's norm sums it itself; Transformer Engine's does not)."""
    parallel = config.parallel
    if parallel.tensor <= 1 or parallel.sequence_parallel:
        return
    if not _may_use_transformer_engine(config.model.transformer_impl):
        return
    kwargs = metadata.model_family.transformer_config_kwargs(metadata.hf_config)
    if kwargs.get("experimental_attention_variant") == "gated_delta_net":
        raise ConfigError(
            "parallel.sequence_parallel",
            f"this {metadata.family} model has Gated-DeltaNet layers, whose output-norm "
            f"gradient Megatron-Core sums over parallel.tensor={parallel.tensor} ranks only "
            "with sequence parallelism under Transformer Engine (without it the ranks' copies "
            "of that weight drift apart); set parallel.sequence_parallel=true",
        )


def preflight(config: FinetuneConfig) -> ModelMetadata:
    """Raise :class:`ConfigError` for what would otherwise fail inside every rank."""
    for key, path in _datasets(config):
        _check_dataset(config, key, path)
    _check_save_dir(config)
    metadata = _model_metadata(config)
    try:
        check_layout(metadata, parallel_layout(config))
    except LayoutError as error:
        raise ConfigError(f"parallel.{error.option}", str(error)) from None
    _check_moe_sequence_parallel(config, metadata)
    _check_gated_delta_net_sequence_parallel(config, metadata)
    if not config.data.allow_tokenizer_mismatch:
        for key, path in _datasets(config):
            if path is None:
                continue
            try:
                check_dataset_for_model(
                    path,
                    metadata,
                    config.model.checkpoint,
                    override_hint="data.allow_tokenizer_mismatch=true accepts it",
                )
            except DatasetModelMismatch as error:
                raise ConfigError(key, str(error)) from None
    return metadata
