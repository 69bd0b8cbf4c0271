"""Megatron-Bridge's checkpoint description, written and read without importing Bridge.

Bridge (``megatron.bridge.training.checkpointing``) reads ``run_config.yaml`` from the
iteration directory of every checkpoint it loads, ``checkpoint.pretrained_checkpoint``
included: the saved tensor / pipeline parallel sizes and whether optimizer and RNG state were
saved (without the file it looks for Megatron-LM's pickled ``args`` and refuses the checkpoint).
:func:`write_bridge_run_config` writes exactly that into our checkpoints.

The other way, a checkpoint saved by Bridge's ``finetune()`` has no
``megatron_eaft_model.json``; its ``run_config.yaml`` holds the whole ``ConfigContainer``,
the model provider included. :func:`read_model_metadata` describes such a checkpoint: from
our metadata in the checkpoint Bridge started from when that is still there (the HF config
as converted, every field), else by mapping the provider's fields back to an HF config
(:func:`hf_config_from_bridge_model`), checked against the family's forward mapping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from megatron_eaft.models.checkpoint_dir import (
    MegatronCheckpointError,
    checkpoint_dir,
    read_tracker,
)
from megatron_eaft.models.families import all_families, get_family
from megatron_eaft.models.family import UnsupportedConfigError, megatron_gpt_layer_spec
from megatron_eaft.models.metadata import MODEL_METADATA_FILE, ModelMetadata, read_json_object

BRIDGE_RUN_CONFIG_FILE = "run_config.yaml"

# HF config key <- Bridge provider (TransformerConfig) field, for the Llama-style families.
HF_FROM_PROVIDER = {
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "head_dim": "kv_channels",
    "rms_norm_eps": "layernorm_epsilon",
    "max_position_embeddings": "seq_length",
    "tie_word_embeddings": "share_embeddings_and_output_weights",
    "vocab_size": "vocab_size",
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "num_experts": "num_moe_experts",
    "num_experts_per_tok": "moe_router_topk",
}
MOE_FIELDS = ("moe_ffn_hidden_size", "num_moe_experts", "moe_router_topk")
_BRIDGE_DTYPES = {"bf16": "bf16", "fp16": "fp16"}


def write_bridge_run_config(
    iteration_dir: str | os.PathLike,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    saved_optimizer: bool = False,
    saved_rng: bool = False,
) -> Path:
    """The ``run_config.yaml`` Bridge needs to load ``iteration_dir`` (Bridge 0.6).

    A converted checkpoint holds full tensors (any layout loads it: TP/PP 1) and neither
    optimizer nor RNG state. Bridge compares the sizes with its run's only to decide whether
    saved RNG / optimizer state can be restored.
    """
    config = {
        "model": {
            "tensor_model_parallel_size": tensor_parallel,
            "pipeline_model_parallel_size": pipeline_parallel,
            "encoder_tensor_model_parallel_size": 0,
            "encoder_pipeline_model_parallel_size": 0,
        },
        "checkpoint": {
            "save_optim": saved_optimizer,
            "save_rng": saved_rng,
            "fully_parallel_save": False,
        },
    }
    header = (
        "# What Megatron-Bridge reads to load this checkpoint (checkpoint.pretrained_checkpoint);\n"
        f"# the model is described by ../{MODEL_METADATA_FILE} (megatron-eaft).\n"
    )
    path = Path(iteration_dir) / BRIDGE_RUN_CONFIG_FILE
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# ---- reading a checkpoint Bridge saved -------------------------------------------------------


def read_bridge_run_config(iteration_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed ``run_config.yaml`` of an iteration directory, or None when it has none."""
    path = Path(iteration_dir) / BRIDGE_RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise MegatronCheckpointError(f"{where}: invalid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise MegatronCheckpointError(f"{path}: expected a mapping")
    return config


def read_model_metadata(
    root: str | os.PathLike, iteration: int | str | None = None
) -> ModelMetadata:
    """The model a checkpoint root holds: our metadata, else Bridge's saved run config."""
    root = Path(root)
    if (root / MODEL_METADATA_FILE).is_file() or not root.is_dir():
        return ModelMetadata.read(root)
    # Bridge writes Megatron-LM's tracker next to its own (latest_train_state.pt).
    if iteration is None and read_tracker(root) is None:
        return ModelMetadata.read(root)  # raises, naming what is missing
    iteration_dir = checkpoint_dir(root, iteration)
    run_config = read_bridge_run_config(iteration_dir)
    model = run_config.get("model") if run_config is not None else None
    if not isinstance(model, Mapping) or "_target_" not in model:
        # Not saved by Bridge: the run config we write at import describes no model.
        return ModelMetadata.read(root)
    return metadata_from_bridge_run_config(run_config, str(iteration_dir / BRIDGE_RUN_CONFIG_FILE))


def metadata_from_bridge_run_config(run_config: Mapping[str, Any], where: str) -> ModelMetadata:
    """The model of a Bridge-saved checkpoint, described the way ``convert import`` would.

    The HF config comes from, in this order: our metadata in the checkpoint Bridge started
    from (``checkpoint.pretrained_checkpoint``), the provider's ``hf_model_id`` (a local HF
    directory; AutoBridge providers record it), or the provider's own fields mapped back
    (:func:`hf_config_from_bridge_model`). Whichever it is, the family's TransformerConfig
    for it must equal the model Bridge trained (:func:`check_provider_matches`).
    """
    model = run_config.get("model")
    if not isinstance(model, Mapping):
        raise MegatronCheckpointError(f"{where}: has no model section")
    hf_config = _hf_config_of_start(run_config) or _hf_config_of_hf_model_id(model)
    if hf_config is None:
        hf_config = _hf_config_from_fields(model, where)
    try:
        metadata = ModelMetadata.for_hf_config(
            hf_config,
            dtype=_bridge_dtype(model),
            transformer_impl=_bridge_transformer_impl(model, where),
            source=where,
        )
    except UnsupportedConfigError as exc:
        raise MegatronCheckpointError(f"{where}: {exc}") from None
    check_provider_matches(model, metadata, where)
    return metadata


def _hf_config_of_start(run_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The HF config in our metadata of the checkpoint Bridge started from, if still there."""
    checkpoint = run_config.get("checkpoint")
    start = checkpoint.get("pretrained_checkpoint") if isinstance(checkpoint, Mapping) else None
    if not isinstance(start, str) or not (Path(start) / MODEL_METADATA_FILE).is_file():
        return None
    return dict(ModelMetadata.read(start).hf_config)


def _hf_config_of_hf_model_id(model: Mapping[str, Any]) -> dict[str, Any] | None:
    hf_model_id = model.get("hf_model_id")
    if not isinstance(hf_model_id, str) or not (Path(hf_model_id) / "config.json").is_file():
        return None
    return read_json_object(Path(hf_model_id) / "config.json", MegatronCheckpointError)


def _hf_config_from_fields(model: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The one family whose HF config, built from the provider's fields, gives its model."""
    matches = {}
    for family in all_families():
        try:
            candidate = hf_config_from_bridge_model(model, family, where)
            metadata = ModelMetadata.for_hf_config(
                candidate, dtype="fp32", transformer_impl="local"
            )
            check_provider_matches(model, metadata, where)
        except (MegatronCheckpointError, UnsupportedConfigError, KeyError):
            continue
        matches[family] = candidate
    if len(matches) != 1:
        found = f"it fits {sorted(matches)}" if matches else "it fits none"
        raise MegatronCheckpointError(
            f"{where}: no HF config for this model: neither megatron-eaft metadata in "
            "checkpoint.pretrained_checkpoint nor a local HF directory in model.hf_model_id, and "
            f"mapping the provider's fields back to each of {sorted(all_families())} "
            f"{found}"
        )
    return next(iter(matches.values()))


def hf_config_from_bridge_model(
    model: Mapping[str, Any], family: str, where: str
) -> dict[str, Any]:
    """An HF ``config.json`` for a Bridge provider, as the ``family`` would spell it."""
    architecture = get_family(family).architectures[0]
    hf_config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": _hf_model_type(architecture),
        "hidden_act": "silu",
    }
    experts = bool(model.get("num_moe_experts"))
    for hf_key, field in HF_FROM_PROVIDER.items():
        value = model.get(field)
        if value is not None and (experts or field not in MOE_FIELDS):
            hf_config[hf_key] = value
    for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(hf_config.get(required), int):
            field = HF_FROM_PROVIDER[required]
            raise MegatronCheckpointError(f"{where}: model.{field} missing")
    hf_config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": float(model.get("rotary_base", 10000.0)),
    }
    qkv_bias = bool(model.get("add_qkv_bias", False))
    if family in ("qwen3", "qwen3_moe", "glm4"):
        hf_config["attention_bias"] = qkv_bias
    if family == "glm4":
        hf_config["rope_parameters"]["partial_rotary_factor"] = float(
            model.get("rotary_percent", 1.0)
        )
    if family == "qwen3_moe":
        hf_config["norm_topk_prob"] = not model.get("moe_router_pre_softmax", False)
    return hf_config


def _hf_model_type(architecture: str) -> str:
    """transformers' ``model_type`` of an architecture (``AutoConfig`` needs it)."""
    import transformers

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"), None)
    return getattr(config_class, "model_type", "") or architecture


def _bridge_dtype(model: Mapping[str, Any]) -> str:
    for flag, name in _BRIDGE_DTYPES.items():
        if model.get(flag):
            return name
    return "fp32"


def _bridge_transformer_impl(model: Mapping[str, Any], where: str) -> str:
    impl = model.get("transformer_impl", "transformer_engine")
    if impl not in ("local", "transformer_engine"):
        raise MegatronCheckpointError(
            f"{where}: model.transformer_impl {impl!r} is not local or transformer_engine"
        )
    return impl


# The TransformerConfig / GPTModel fields that decide what a checkpoint's tensors compute, with
# Megatron-Core's defaults for those a family leaves unset.
STRUCTURAL_DEFAULTS: dict[str, Any] = {
    "num_layers": None,
    "hidden_size": None,
    "ffn_hidden_size": None,
    "num_attention_heads": None,
    "num_query_groups": None,
    "kv_channels": None,
    "normalization": "LayerNorm",
    "layernorm_epsilon": 1e-5,
    "gated_linear_unit": False,
    "activation_func": "gelu",
    "add_bias_linear": True,
    "add_qkv_bias": False,
    "qk_layernorm": False,
    "rotary_interleaved": False,
    "num_moe_experts": None,
    "moe_router_topk": 2,
    "moe_ffn_hidden_size": None,
    "moe_router_pre_softmax": False,
    "moe_router_score_function": "softmax",
    "moe_layer_freq": 1,
    "rotary_base": 10000,
    "rotary_percent": 1.0,
    "share_embeddings_and_output_weights": False,
    # Which decoder block a family with its own block builds (Gated-DeltaNet hybrid, MLA).
    "experimental_attention_variant": None,
    "multi_latent_attention": False,
}
# Bridge's GPT layer specs: a provider naming one of them builds Megatron-Core's decoder layer.
BRIDGE_GPT_LAYER_SPECS = ("default_layer_spec", "local_layer_spec", "transformer_engine_layer_spec")
# Where our CPU builds of Bridge's decoder blocks live (``cpu_runtime.use_bridge_cpu_settings``
# puts them into a provider): the same Gated-DeltaNet hybrid / MLA block, built without TE.
CPU_DECODER_SPECS_MODULE = "megatron_eaft.megatron.cpu_runtime."


def check_provider_matches(model: Mapping[str, Any], metadata: ModelMetadata, where: str) -> None:
    """Refuse when the family's model for the HF config differs from the one Bridge trained
    (a structural field, or the decoder layer): an export would describe another model."""
    family = metadata.model_family
    hf = family.hf(metadata.hf_config)
    try:
        expected = {
            **family.transformer_config_kwargs(hf, metadata.hf_variants),
            **family.gpt_model_kwargs(hf),
        }
    except UnsupportedConfigError as exc:
        raise MegatronCheckpointError(f"{where}: {exc}") from None
    unused = _fields_the_model_does_not_read(model)
    differing = [
        f"{field}: Bridge {model[field]!r}, the HF config gives {expected.get(field, default)!r}"
        for field, default in STRUCTURAL_DEFAULTS.items()
        if model.get(field) is not None
        and field not in unused
        and _comparable(model[field]) != _comparable(expected.get(field, default))
    ]
    differing.extend(_layer_spec_differences(family, _layer_spec_name(model)))
    if differing:
        raise MegatronCheckpointError(
            f"{where}: the model Bridge trained is not the {family.name} model its HF config "
            "describes:\n  " + "\n  ".join(differing)
        )


def _fields_the_model_does_not_read(model: Mapping[str, Any]) -> set[str]:
    """Structural fields that no tensor or computation of the provider's model depends on, so
    a provider may leave them at any value (Bridge's do): the attention head width under MLA
    (its own q/k/v head dims), ``moe_router_pre_softmax`` with sigmoid scores (Megatron's
    router reads it for softmax only), the dense FFN width when every layer is MoE."""
    unused = set()
    if model.get("multi_latent_attention"):
        unused.add("kv_channels")
    if model.get("moe_router_score_function", "softmax") != "softmax":
        unused.add("moe_router_pre_softmax")
    frequency = model.get("moe_layer_freq", 1)
    every_layer_moe = frequency == 1 or (isinstance(frequency, list) and set(frequency) == {1})
    if model.get("num_moe_experts") and every_layer_moe:
        unused.add("ffn_hidden_size")
    return unused


def _layer_spec_differences(family: Any, layer: str) -> list[str]:
    """Whether Bridge's ``transformer_layer_spec`` builds the family's decoder.

    A family with its own layer (GLM-4's sandwich norms) or its own decoder block (the
    Gated-DeltaNet hybrid, MLA with dense-first layers) is not built by Bridge's GPT layer
    specs; which block a block spec builds is told by the structural fields
    (``experimental_attention_variant``, ``multi_latent_attention``), checked with the others.
    Of our specs, a block family takes only our CPU builds of Bridge's blocks, and a family of
    Megatron's plain GPT layer none.
    """
    own_layer = family.layer_spec_fn is not megatron_gpt_layer_spec
    own_block = family.block_spec_fn is not None
    if (own_layer or own_block) and layer in BRIDGE_GPT_LAYER_SPECS:
        kind = "layer" if own_layer else "decoder block"
        return [f"transformer_layer_spec: Bridge {layer}, {family.name} has its own {kind}"]
    if not layer.startswith("megatron_eaft.") or own_layer:
        return []
    if own_block and layer.startswith(CPU_DECODER_SPECS_MODULE):
        return []
    return [f"transformer_layer_spec: Bridge {layer}, {family.name} has none"]


def _layer_spec_name(model: Mapping[str, Any]) -> str:
    spec = model.get("transformer_layer_spec")
    target = spec.get("_target_") if isinstance(spec, Mapping) else None
    if not isinstance(target, str):
        return ""
    if target.startswith("megatron_eaft."):
        return target
    return target.rpartition(".")[2]


def _comparable(value: Any) -> Any:
    if isinstance(value, Mapping) and "_target_" in value:
        return str(value["_target_"]).rpartition(".")[2]
    if callable(value):
        return getattr(value, "__name__", repr(value))
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
