"""The `megatron-eaft finetune` configuration: a YAML file of sections, plus dotted overrides.

Schema (every key optional unless marked; defaults are the EAFT paper's fine-tuning setting)::

    model:
      checkpoint: DIR          # converted torch_dist checkpoint (`megatron-eaft convert import`)
      preset: tiny-qwen3       # or: random-initialised model built in code (tests, demos)
      hf_config: FILE          # or: random-initialised model of an HF config.json
      transformer_impl: auto   # auto | local | transformer_engine
      dtype: bf16              # bf16 | fp16 | fp32
    parallel:
      tensor: 1, pipeline: 1, context: 1, expert: 1
      first_stage_layers: null, last_stage_layers: null   # uneven pipeline stages
      sequence_parallel: false
      distributed_optimizer: true
    data:
      path: DIR                # required: a `megatron-eaft prepare-data` output
      eval_path: DIR
      micro_batch_size: 1
      global_batch_size: 64    # = micro_batch_size * micro-batches * data-parallel size
      shuffle: true
      seed: 1234
      allow_tokenizer_mismatch: false   # refuse data tokenised for another model
    train:
      iterations: N            # or epochs (one of the two is required)
      epochs: 10
      seed: 1234
    optimizer:
      lr: 1.0e-5, min_lr: 0.0, warmup_fraction: 0.03, warmup_iterations: null,
      decay_style: cosine, weight_decay: 0.0, adam_beta1: 0.9, adam_beta2: 0.999,
      adam_eps: 1.0e-8, clip_grad: 1.0
    eaft:                      # megatron_eaft.ops.EAFTConfig (kind, topk, alpha, entropy, ...)
      kind: eaft
    checkpoint:
      save: DIR                # iter_XXXXXXX/ + latest_checkpointed_iteration.txt
      save_interval: N
      load: DIR                # resume from here (default: `save`, if it has a checkpoint)
      optimizer_sharding: dp_reshardable   # or fully_reshardable (resume at another TP/PP)
    eval:
      interval: N, iterations: 10
      sets: {domain: DIR, general: DIR}   # named sets, next to (or instead of) data.eval_path
    logging:
      interval: 10
      tensorboard_dir: DIR
      metrics_file: FILE       # one JSON line per iteration (last rank)
      wandb_project: NAME      # W&B run with TensorBoard's scalars (+ wandb_run_name,
                               # wandb_entity, wandb_offline); the `wandb` extra

Overrides are ``section.key=value`` strings whose value is parsed as YAML (``optimizer.lr=2e-5``,
``checkpoint.save=null``). Every error names the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_eaft.ops.config import EAFTConfig

TINY_PRESETS = ("tiny-qwen3",)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self._arguments = (key, message, source)
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")

    def __reduce__(self) -> tuple:
        # Picklable, so that a rank's ConfigError reaches the caller of a worker pool.
        return (type(self), self._arguments)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


@dataclasses.dataclass
class ModelSection:
    """Which model to fine-tune and how to build it.

    checkpoint: a converted (or previously fine-tuned) checkpoint directory; the model is
        rebuilt from its ``megatron_eaft_model.json`` and loaded at any TP/PP.
    preset: instead of a checkpoint, a random-initialised model built in code ("tiny-qwen3").
    hf_config: or a random-initialised model of an HF ``config.json`` (benchmarks, smoke runs).
    transformer_impl: Megatron-Core layer implementation. auto = Transformer Engine when it is
        importable and a GPU is present, else Megatron-Core's local (torch) layers.
    dtype: parameter dtype; bf16/fp16 keep fp32 master weights in the optimizer.
    """

    checkpoint: str | None = None
    preset: str | None = None
    hf_config: str | None = None
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"

    def __post_init__(self) -> None:
        sources = [self.checkpoint, self.preset, self.hf_config]
        _check(
            sum(source is not None for source in sources) == 1,
            "model.checkpoint",
            "give exactly one of model.checkpoint (a converted checkpoint directory), "
            f"model.preset ({', '.join(TINY_PRESETS)}) or model.hf_config (an HF config.json)",
        )
        _check(
            self.preset is None or self.preset in TINY_PRESETS,
            "model.preset",
            f"must be one of {', '.join(TINY_PRESETS)}, got {self.preset!r}",
        )


@dataclasses.dataclass
class ParallelSection:
    """Model-parallel sizes; data-parallel size = world size / (tensor * pipeline * context)."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    expert: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "context", "expert"):
            _check(getattr(self, name) >= 1, f"parallel.{name}", "must be >= 1")
        for name in ("first_stage_layers", "last_stage_layers"):
            count = getattr(self, name)
            _check(count is None or count >= 1, f"parallel.{name}", "must be >= 1")
            _check(count is None or self.pipeline > 1, f"parallel.{name}", "needs pipeline > 1")
        _check(
            not self.sequence_parallel or self.tensor > 1,
            "parallel.sequence_parallel",
            "needs parallel.tensor > 1",
        )

    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline * self.context

    def data_parallel_size(self, world_size: int) -> int:
        size = self.model_parallel_size()
        if world_size % size:
            raise ConfigError(
                "parallel",
                f"world size {world_size} is not a multiple of tensor * pipeline * context = "
                f"{self.tensor} * {self.pipeline} * {self.context}",
            )
        return world_size // size


@dataclasses.dataclass
class DataSection:
    """The prepared SFT dataset and how it is batched.

    global_batch_size rows make one optimizer step; each data-parallel rank runs
    global_batch_size / (micro_batch_size * DP) micro-batches through the pipeline schedule.
    The row order is a fresh permutation per epoch (seeded), the same at any parallel layout.
    """

    path: str | None = None
    eval_path: str | None = None
    micro_batch_size: int = 1
    global_batch_size: int = 64
    shuffle: bool = True
    seed: int = 1234
    allow_tokenizer_mismatch: bool = False

    def __post_init__(self) -> None:
        _check(self.micro_batch_size >= 1, "data.micro_batch_size", "must be >= 1")
        _check(self.global_batch_size >= 1, "data.global_batch_size", "must be >= 1")

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                "data.global_batch_size",
                f"{self.global_batch_size} is not a multiple of data.micro_batch_size * "
                f"data-parallel size = {self.micro_batch_size} * {data_parallel_size}",
            )
        return self.global_batch_size // per_step


@dataclasses.dataclass
class TrainSection:
    """Length of the run: iterations (optimizer steps), or epochs over data.path."""

    iterations: int | None = None
    epochs: float | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        _check(
            (self.iterations is None) != (self.epochs is None),
            "train.iterations",
            "give exactly one of train.iterations or train.epochs",
        )
        # A run of no steps would only write a checkpoint identical to its start.
        _check(
            self.iterations is None or self.iterations >= 1,
            "train.iterations",
            f"must be >= 1 (a positive number of optimizer steps), got {self.iterations}",
        )
        _check(
            self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0),
            "train.epochs",
            f"must be a positive number, got {self.epochs}",
        )

    def total_iterations(self, dataset_rows: int, global_batch_size: int) -> int:
        if self.iterations is not None:
            return self.iterations
        assert self.epochs is not None
        return max(1, math.ceil(self.epochs * dataset_rows / global_batch_size))


@dataclasses.dataclass
class OptimizerSection:
    """AdamW with linear warm-up then decay to min_lr (the paper: 1e-5, cosine, 3 % warm-up).

    warmup_iterations, when set, replaces warmup_fraction * iterations.
    """

    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_fraction: float = 0.03
    warmup_iterations: int | None = None
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optimizer.lr", f"must be > 0, got {self.lr}")
        _check(
            0 <= self.min_lr <= self.lr,
            "optimizer.min_lr",
            f"must be in [0, optimizer.lr={self.lr}], got {self.min_lr}",
        )
        _check(0 <= self.warmup_fraction < 1, "optimizer.warmup_fraction", "must be in [0, 1)")
        _check(
            self.warmup_iterations is None or self.warmup_iterations >= 0,
            "optimizer.warmup_iterations",
            "must be >= 0",
        )
        _check(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, f"optimizer.{name}", "must be in [0, 1)")
        _check(self.adam_eps > 0, "optimizer.adam_eps", "must be > 0")
        _check(self.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0 (0 disables clipping)")

    def warmup_steps(self, total_iterations: int) -> int:
        if self.warmup_iterations is not None:
            return self.warmup_iterations
        return round(self.warmup_fraction * total_iterations)


@dataclasses.dataclass
class CheckpointSection:
    """Periodic torch_dist checkpoints and resume.

    save: root directory; each checkpoint is save/iter_XXXXXXX, and
        latest_checkpointed_iteration.txt names the last complete one.
    save_interval: iterations between checkpoints (null: only at the end and on SIGTERM).
    load: root to resume from (model, optimizer, LR schedule, iteration, data position, RNG);
        defaults to `save` when that already holds a checkpoint.
    optimizer_sharding: dp_reshardable (fast; resume at the same TP/PP) or fully_reshardable
        (resume at any TP/PP/DP; the distributed optimizer gathers its state to save it).
    """

    save: str | None = None
    save_interval: int | None = None
    load: str | None = None
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"

    def __post_init__(self) -> None:
        _check(
            self.save_interval is None or self.save_interval >= 1,
            "checkpoint.save_interval",
            "must be >= 1",
        )
        _check(
            self.save_interval is None or self.save is not None,
            "checkpoint.save_interval",
            "needs checkpoint.save",
        )


# An evaluation set's name prefixes its metric keys (``eval/general/lm loss``): no slashes or
# spaces, and not "eaft", whose keys (``eval/eaft/mean_entropy``) data.eval_path reports.
EVAL_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RESERVED_EVAL_SET_NAMES = ("eaft",)


@dataclasses.dataclass
class EvalSection:
    """Evaluation every `interval` iterations (null: never) on data.eval_path and eval.sets.

    Each set reports plain cross-entropy (``lm loss``) and the EAFT statistics of its loss
    tokens, under ``eval/`` (data.eval_path) or ``eval/NAME/`` (a set of eval.sets). A general
    set (e.g. plain text, ``prepare-data --format text``) shows how much the model forgets.
    """

    interval: int | None = None
    iterations: int = 10
    sets: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.interval is None or self.interval >= 1, "eval.interval", "must be >= 1")
        _check(self.iterations >= 1, "eval.iterations", "must be >= 1")
        for name in self.sets:
            _check(
                bool(EVAL_SET_NAME.fullmatch(name)) and name not in RESERVED_EVAL_SET_NAMES,
                f"eval.sets.{name}",
                "a set name is letters, digits, '_', '.' or '-' (it names the set's metrics), "
                f"and not {', '.join(RESERVED_EVAL_SET_NAMES)}",
            )


@dataclasses.dataclass
class LoggingSection:
    """Console line every `interval` iterations; TensorBoard, JSONL and W&B every step (last rank).

    wandb_project: a Weights & Biases run logging TensorBoard's scalar keys (at step =
        iteration) and the configuration; wandb_offline writes it locally for `wandb sync`
        (WANDB_MODE and WANDB_DIR apply as usual). Needs the `wandb` extra.
    """

    interval: int = 10
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    wandb_entity: str | None = None
    wandb_offline: bool = False

    def __post_init__(self) -> None:
        _check(self.interval >= 1, "logging.interval", "must be >= 1")
        for name in ("wandb_run_name", "wandb_entity", "wandb_offline"):
            _check(
                self.wandb_project is not None or not getattr(self, name),
                f"logging.{name}",
                "needs logging.wandb_project",
            )
        # Found here, before any process starts, not after the model is built.
        _check(
            self.wandb_project is None or importlib.util.find_spec("wandb") is not None,
            "logging.wandb_project",
            "needs the wandb package: pip install 'megatron-eaft[wandb]'",
        )


@dataclasses.dataclass
class FinetuneConfig:
    model: ModelSection
    train: TrainSection
    data: DataSection = dataclasses.field(default_factory=DataSection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    eaft: EAFTConfig = dataclasses.field(default_factory=EAFTConfig)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        _check(
            self.train.epochs is None or self.data.path is not None,
            "train.epochs",
            "needs data.path",
        )
        _check(
            self.eval.interval is None or bool(self.eval_sets()),
            "eval.interval",
            "needs data.eval_path or eval.sets",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def eval_sets(self) -> dict[str, str]:
        """Evaluation sets by name; data.eval_path is the unnamed one ("")."""
        unnamed = {"": self.data.eval_path} if self.data.eval_path is not None else {}
        return {**unnamed, **self.eval.sets}

    def resume_dir(self) -> str | None:
        return self.checkpoint.load or self.checkpoint.save


# --- loading ---------------------------------------------------------------------------------


def _is_dataclass_type(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        return f"mapping of {_describe(key_type)} to {_describe(value_type)}"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` as `annotation` (int, float, bool, str, Literal, unions with None) or ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_describe(annotation)}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(annotation):
            return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        # PyYAML reads "1e-5" (no dot) as a string; accept any spelling float() takes.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    elif origin is dict:
        if isinstance(value, dict):
            key_type, value_type = typing.get_args(annotation)
            return {
                _coerce(name, key_type, f"{key}.{name}"): _coerce(item, value_type, f"{key}.{name}")
                for name, item in value.items()
            }
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    raise ConfigError(key, f"expected {_describe(annotation)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(key, f"unknown key; known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        key = f"{prefix}{name}"
        if _is_dataclass_type(annotation):
            kwargs[name] = _build(annotation, value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, annotation, key)
    for name, field in fields.items():
        if (
            name not in kwargs
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        ):
            annotation = hints[name]
            if _is_dataclass_type(annotation):
                kwargs[name] = _build(annotation, {}, f"{prefix}{name}.")
            else:
                raise ConfigError(f"{prefix}{name}", "is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        # EAFTConfig validates itself: "EAFTConfig.topk=1 is invalid: must be ..."
        match = re.match(rf"{cls.__name__}\.(\w+)=", str(error))
        key = prefix + match.group(1) if match else prefix.rstrip(".") or "<root>"
        raise ConfigError(key, str(error)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=2e-5"`` -> (["optimizer", "lr"], 2e-05); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(text, "an override must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(key, f"cannot parse override value {raw!r}: {error}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[: depth + 1]), "is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _relative_to(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def config_from_dict(
    data: dict[str, Any], overrides: list[str] = (), *, source: str | None = None
) -> FinetuneConfig:
    data = apply_overrides(copy.deepcopy(dict(data)), list(overrides))
    try:
        return _build(FinetuneConfig, data, "")
    except ConfigError as error:
        if source is None:
            raise
        raise ConfigError(error.key, str(error).split(": ", 1)[1], source) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> FinetuneConfig:
    """Read a YAML config and apply overrides; relative paths in it are relative to its folder."""
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("--config", f"{path} does not exist") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError("<yaml>", f"{where}: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("<root>", "the YAML file must hold a mapping of sections", source)
        data = loaded or {}
    config = config_from_dict(data, overrides, source=source)
    if path is not None:
        _resolve_paths(config, Path(path).absolute().parent)
    return config


def _resolve_paths(config: FinetuneConfig, base: Path) -> None:
    config.model.checkpoint = _relative_to(base, config.model.checkpoint)
    config.model.hf_config = _relative_to(base, config.model.hf_config)
    config.data.path = _relative_to(base, config.data.path)
    config.data.eval_path = _relative_to(base, config.data.eval_path)
    config.eval.sets = {name: _relative_to(base, path) for name, path in config.eval.sets.items()}
    config.checkpoint.save = _relative_to(base, config.checkpoint.save)
    config.checkpoint.load = _relative_to(base, config.checkpoint.load)
    config.logging.tensorboard_dir = _relative_to(base, config.logging.tensorboard_dir)
    config.logging.metrics_file = _relative_to(base, config.logging.metrics_file)


KEY_HELP: dict[str, str] = {
    "model.checkpoint": "converted (or fine-tuned) checkpoint directory to start from",
    "model.preset": "random-initialised model built in code instead: tiny-qwen3",
    "model.hf_config": "or a random-initialised model of this HF config.json",
    "model.transformer_impl": "Megatron layers: auto (TE on GPU when importable), local, transformer_engine",
    "model.dtype": "parameter dtype; bf16/fp16 keep fp32 master weights",
    "train.iterations": "optimizer steps to run (or give train.epochs)",
    "train.epochs": "passes over data.path, rounded up to whole steps",
    "train.seed": "seed of weight init, dropout and the RNG tracker",
    "data.path": "training data: a `megatron-eaft prepare-data` output directory",
    "data.eval_path": "evaluation data (same format), reported as eval/lm loss (plain CE), eval/eaft/...",
    "data.micro_batch_size": "rows per micro-batch",
    "data.global_batch_size": "rows per optimizer step = micro batch * micro-batches * DP",
    "data.shuffle": "new seeded row order every epoch (same order at any layout)",
    "data.seed": "seed of the row order",
    "data.allow_tokenizer_mismatch": "train on data tokenised with another tokenizer than the model's",
    "parallel.tensor": "tensor-parallel size",
    "parallel.pipeline": "pipeline-parallel size (divides the layer count, or see first_stage_layers)",
    "parallel.first_stage_layers": "layers of the first pipeline stage; the other stages share the rest",
    "parallel.last_stage_layers": "layers of the last pipeline stage; the other stages share the rest",
    "parallel.context": "context-parallel size (Transformer Engine attention)",
    "parallel.expert": "expert-parallel size (MoE models)",
    "parallel.sequence_parallel": "sequence parallelism with TP (Transformer Engine)",
    "parallel.distributed_optimizer": "shard optimizer state over data-parallel ranks",
    "optimizer.lr": "peak learning rate (the paper: 1e-5)",
    "optimizer.min_lr": "learning rate at the end of the decay",
    "optimizer.warmup_fraction": "linear warm-up as a fraction of the run (the paper: 0.03)",
    "optimizer.warmup_iterations": "warm-up steps; overrides warmup_fraction",
    "optimizer.decay_style": "decay after warm-up: cosine, linear or constant",
    "optimizer.weight_decay": "AdamW weight decay (not on biases and norms)",
    "optimizer.adam_beta1": "Adam beta1",
    "optimizer.adam_beta2": "Adam beta2",
    "optimizer.adam_eps": "Adam epsilon",
    "optimizer.clip_grad": "global gradient-norm clip (0 disables)",
    "eaft.kind": "token weights: eaft, sft (plain CE), dft, sigmoid, masked",
    "eaft.topk": "K of the top-K entropy (the paper: 20)",
    "eaft.alpha": "exponent of the normalised entropy (EAFT^p)",
    "eaft.entropy": "topk (the paper's estimate) or exact (full vocabulary)",
    "eaft.norm": "entropy normaliser: lnk (ln K), paper (3.0), lnv (ln V, exact only)",
    "eaft.sigmoid_scale": "kind sigmoid: w = sigmoid(scale * (H - center))",
    "eaft.sigmoid_center": "kind sigmoid: centre of the gate",
    "eaft.masked_entropy_threshold": "kind masked: drop tokens with H below this ...",
    "eaft.masked_prob_threshold": "... and target probability below this",
    "eaft.conflict_entropy_threshold": "diagnostic confident conflict: H below this ...",
    "eaft.conflict_prob_threshold": "... and target probability below this",
    "eaft.diagnostics": "report entropy statistics for every kind (sft and dft too)",
    "eaft.check_finite": "raise on NaN/+inf logits (one sync per micro-batch); -inf is legal",
    "eaft.ignore_index": "label value of positions without loss",
    "eaft.fused_output": "output layer + loss in chunks: the logits never materialise",
    "eaft.fused_chunk_tokens": "tokens per fused chunk (0: from fused_chunk_memory_mib)",
    "eaft.fused_chunk_memory_mib": "memory budget of one fused chunk's logits (MiB)",
    "eaft.fused_gradient": "fused gradients: recompute (logits again in backward) or forward "
    "(one GEMM fewer, an fp32 weight-sized buffer)",
    "eaft.mtp": "MTP heads' loss: weighted (like the main head, own logits) or plain (CE)",
    "checkpoint.save": "directory for iter_XXXXXXX checkpoints (and resume)",
    "checkpoint.save_interval": "steps between checkpoints (also saved at the end and on SIGTERM)",
    "checkpoint.load": "resume from this directory instead of checkpoint.save",
    "checkpoint.optimizer_sharding": "dp_reshardable (same TP/PP on resume) or fully_reshardable",
    "eval.interval": "steps between evaluations on data.eval_path and eval.sets (null: none)",
    "eval.iterations": "global batches per evaluation (per set)",
    "eval.sets": "named evaluation sets {NAME: DIR}, reported as eval/NAME/lm loss, eval/NAME/eaft/...",
    "logging.interval": "steps per console line",
    "logging.tensorboard_dir": "TensorBoard event directory (last rank)",
    "logging.metrics_file": "JSON line per step (losses, lr, grad norm, speed), appended",
    "logging.wandb_project": "W&B project: log TensorBoard's scalars there too (`wandb` extra)",
    "logging.wandb_run_name": "W&B run name (default: W&B's generated one)",
    "logging.wandb_entity": "W&B entity (team or user; default: your default entity)",
    "logging.wandb_offline": "write the W&B run locally (upload later with `wandb sync`)",
}


def all_keys() -> list[str]:
    """Every configurable key as section.key."""
    hints = typing.get_type_hints(FinetuneConfig)
    return [
        f"{section.name}.{field.name}"
        for section in dataclasses.fields(FinetuneConfig)
        for field in dataclasses.fields(hints[section.name])
    ]


def _show(value: Any) -> str:
    return (
        "null"
        if value is None
        else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    )


def schema_help() -> str:
    """Every key with its type, default and meaning, for `--help`."""
    hints = typing.get_type_hints(FinetuneConfig)
    lines = []
    for section_field in dataclasses.fields(FinetuneConfig):
        section = hints[section_field.name]
        section_hints = typing.get_type_hints(section)
        defaults = _section_defaults(section)
        lines.append(f"{section_field.name}:")
        for field in dataclasses.fields(section):
            key = f"{section_field.name}.{field.name}"
            default = _show(defaults[field.name]) if field.name in defaults else "(required)"
            lines.append(
                f"  {field.name}: {_describe(section_hints[field.name])} = {default}\n"
                f"      {KEY_HELP.get(key, '')}"
            )
    return "\n".join(lines)


def _section_defaults(section: type) -> dict[str, Any]:
    values = {}
    for field in dataclasses.fields(section):
        if field.default is not dataclasses.MISSING:
            values[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
    return values
