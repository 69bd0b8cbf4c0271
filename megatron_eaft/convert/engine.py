"""The conversion engine: expands a family table over layers and experts and streams tensors.

Import (HF safetensors -> torch_dist) and export (torch_dist -> HF safetensors) walk the same
:class:`ConversionPlan` in the same order (embeddings, then layer by layer, then the final
norm and output layer, roughly the order HF files store them), converting one
(row, layer, expert) unit at a time: peak memory is one unit's tensors, the largest being
the embedding, never the model. Everything is checked before the first byte of data moves:
missing, unexpected and mis-shaped tensors are reported together, by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_eaft.convert.checkpoint import CARRIED_TENSORS_DIR, HF_SIDE_FILES, copy_side_files
from megatron_eaft.convert.hf_io import (
    CONFIG_FILE,
    SAFETENSORS_INDEX,
    PlannedTensor,
    SafetensorsReader,
    SafetensorsShardWriter,
    plan_shards,
    read_json,
)
from megatron_eaft.convert.torch_dist import TorchDistReader, TorchDistWriter
from megatron_eaft.models.bridge_config import read_model_metadata, write_bridge_run_config
from megatron_eaft.models.build import DTYPES
from megatron_eaft.models.checkpoint_dir import (
    HF_FILES_DIR,
    RELEASE,
    TRACKER_FILE,
    checkpoint_dir,
)
from megatron_eaft.models.families import family_for_hf_config
from megatron_eaft.models.family import (
    DEFAULT_VOCAB_DIVISOR,
    EXPERT,
    LAYER,
    LAYERS_PREFIX,
    MTP,
    MTP_ABSENT,
    MTP_CONVERTED,
    MTP_LAYOUT,
    PLAIN_LAYOUT,
    Dims,
    HFConfig,
    HFLayout,
    ModelFamily,
    PadVocab,
    Param,
    Shape,
    check_transformer_impl,
    padded_vocab_size,
)
from megatron_eaft.models.metadata import MODEL_METADATA_FILE, ModelMetadata
from megatron_eaft.outputs import (
    OutputKind,
    atomic_output_dir,
    check_output_target,
    human_bytes,
    write_text_atomically,
)

logger = logging.getLogger(__name__)

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# How HF configs spell dtypes ("torch_dtype" in transformers 4, "dtype" in 5).
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Keys Megatron training checkpoints hold next to the model that export leaves behind: the
# optimizer's (``chained_<i>.optimizer.`` from a ChainedOptimizer, as Megatron builds one for
# the expert parameters of an expert-parallel MoE run), RNG and rerun state.
NON_MODEL_KEY_PATTERN = re.compile(
    r"(chained_\d+\.)?optimizer\.|rng_state|rerun_state_machine_state"
)
MAX_LISTED = 20

# What `--force` may replace: a previous output of the same command (see megatron_eaft.outputs).
MEGATRON_OUTPUT = OutputKind(
    "megatron-checkpoint",
    "a Megatron checkpoint made by `convert import`",
    (TRACKER_FILE, RELEASE, MODEL_METADATA_FILE, HF_FILES_DIR),
)
HF_OUTPUT = OutputKind(
    "hf-checkpoint",
    "an HF checkpoint made by `convert export`",
    (CONFIG_FILE, "*.safetensors", SAFETENSORS_INDEX, *HF_SIDE_FILES),
)


class ConversionError(ValueError):
    """The source checkpoint does not match what its family expects; lists the keys."""


def _listing(title: str, items: Sequence[str]) -> str:
    shown = "\n    ".join(items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def mismatch_error(
    what: str, missing: Sequence[str], unexpected: Sequence[str], misshaped: Sequence[str]
) -> ConversionError | None:
    if not (missing or unexpected or misshaped):
        return None
    parts = [f"{what}:"]
    if missing:
        parts.append(_listing("missing", sorted(missing)))
    if unexpected:
        parts.append(_listing("unexpected", sorted(unexpected)))
    if misshaped:
        parts.append(_listing("wrong shape", sorted(misshaped)))
    return ConversionError("\n".join(parts))


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One conversion step: a row of the table at one layer and expert.

    Most rows make one Megatron tensor; a splitting transform makes several (``keys``).
    """

    param: Param
    keys: tuple[str, ...]
    layer: int | None
    expert: int | None
    mtp: int | None
    hf_names: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    shapes: tuple[Shape, ...]  # each key's chunk shape without the stacked layer / expert axes
    global_shapes: tuple[Shape, ...]
    prefix: tuple[int, ...]  # offsets along the stacked layer / expert axes


# Linear modules Megatron gives an ``_extra_state`` (FP8 metadata) besides ``linear_*``:
# Gated DeltaNet's projections, the MTP layers' input projection.
_OTHER_LINEAR_MODULES = ("in_proj", "out_proj", "eh_proj")
MTP_KEYS_PREFIX = "mtp."


def _linear_module(key: str) -> str | None:
    """The linear module a weight key belongs to (``...linear_qkv.weight``), else None."""
    module, found, _ = key.partition(".weight")
    if not found:
        return None
    leaf = module.rpartition(".")[2]
    return module if leaf.startswith("linear_") or leaf in _OTHER_LINEAR_MODULES else None


@dataclass(frozen=True)
class ConversionPlan:
    family: ModelFamily
    hf: HFConfig
    dims: Dims
    transformer_impl: str
    params: tuple[Param, ...]
    # Megatron-Core writes decoder.layers.{i}. keys (no stacked layer axis) when layers differ.
    indexed_layers: bool = False
    layout: HFLayout = PLAIN_LAYOUT
    # Per group of alternative HF layouts (`Param.variant`), the one this plan reads / writes.
    variants: Mapping[str, str] = field(default_factory=dict)

    def _rows(self, placement: str) -> list[Param]:
        if placement == "layers":
            return [p for p in self.params if p.per_layer]
        if placement == "mtp":
            return [p for p in self.params if p.per_mtp]
        rows = [p for p in self.params if not (p.per_layer or p.per_mtp)]
        embedding = [p for p in rows if p.key(self.transformer_impl).startswith("embedding.")]
        if placement == "first":
            return embedding
        return [p for p in rows if p not in embedding]

    def layers_of(self, param: Param) -> list[int]:
        return [i for i in range(self.dims.layers) if param.layers(self.hf, i)]

    def units(self) -> Iterator[Unit]:
        for param in self._rows("first"):
            yield self._unit(param, None, None)
        for layer in range(self.dims.layers):
            for param in self._rows("layers"):
                if not param.layers(self.hf, layer):
                    continue
                experts = range(self.dims.experts) if param.per_expert else [None]
                for expert in experts:
                    yield self._unit(param, layer, expert)
        for mtp in range(self.mtp_layers):
            for param in self._rows("mtp"):
                experts = range(self.dims.experts) if param.per_expert else [None]
                for expert in experts:
                    yield self._unit(param, None, expert, mtp)
        for param in self._rows("last"):
            yield self._unit(param, None, None)

    @property
    def mtp_layers(self) -> int:
        """Multi-token-prediction layers converted (their rows have ``{mtp}``)."""
        return self.family.converted_mtp_layers(self.hf, self.variants)

    def megatron_keys(
        self, param: Param, layer: int | None, mtp: int | None = None
    ) -> tuple[str, ...]:
        keys = param.keys(self.transformer_impl)
        if mtp is not None:
            # MTP layers are saved one key per layer, never stacked.
            return tuple(k.replace(MTP, str(mtp)) for k in keys)
        if layer is None or not self.indexed_layers:
            return keys
        return tuple(f"{LAYERS_PREFIX}{layer}.{k[len(LAYERS_PREFIX) :]}" for k in keys)

    def _unit(
        self, param: Param, layer: int | None, expert: int | None, mtp: int | None = None
    ) -> Unit:
        hf_mtp = str(mtp + self.family.mtp_hf_offset(self.hf)) if mtp is not None else MTP
        names = tuple(
            self.layout.hf_name(
                n.replace(LAYER, str(layer)).replace(EXPERT, str(expert)).replace(MTP, hf_mtp)
            )
            for n in param.hf_names
        )
        hf_shapes = tuple(self.dims.resolve(s) for s in param.hf_shapes)
        shapes = tuple(tuple(s) for s in param.transform.megatron_shapes(hf_shapes, self.dims))
        stacked_layer = layer if not self.indexed_layers else None
        axes = ((self.dims.layers, stacked_layer), (self.dims.experts, expert))
        leading = tuple(n for n, used in axes if used is not None)
        return Unit(
            param=param,
            keys=self.megatron_keys(param, layer, mtp),
            layer=layer,
            expert=expert,
            mtp=mtp,
            hf_names=names,
            hf_shapes=hf_shapes,
            shapes=shapes,
            global_shapes=tuple((*leading, *shape) for shape in shapes),
            prefix=tuple(i for _, i in axes if i is not None),
        )

    def _probe_units(self, param: Param) -> Iterator[Unit]:
        """One unit per distinct Megatron key of the row (expert 0)."""
        expert = 0 if param.per_expert else None
        if param.per_mtp:
            for mtp in range(self.mtp_layers):
                yield self._unit(param, None, expert, mtp)
        elif not param.per_layer:
            yield self._unit(param, None, None)
        elif self.indexed_layers:
            for layer in self.layers_of(param):
                yield self._unit(param, layer, expert)
        else:
            yield self._unit(param, 0, expert)

    def global_shapes(self) -> dict[str, Shape]:
        shapes: dict[str, Shape] = {}
        for param in self.params:
            for probe in self._probe_units(param):
                shapes.update(zip(probe.keys, probe.global_shapes, strict=True))
        return shapes

    def extra_state_objects(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """(key, offset, global shape) of each ``_extra_state`` Megatron's linear layers save.

        Megatron-Core's linear layers (local and Transformer Engine) carry an ``_extra_state``
        (FP8 metadata; None without FP8) saved as one ShardedObject per layer (and expert):
        stacked layers share a key with a [layer(, expert)] grid, per-layer keys have a
        [1] grid, or [expert] for expert modules.
        """
        objects = []
        seen = set()
        for param in self.params:
            # Layer modules; the embedding's and output layer's extra states are not saved.
            in_mtp = param.key(self.transformer_impl).startswith(MTP_KEYS_PREFIX)
            if not (param.per_layer or in_mtp):
                continue
            for probe in self._probe_units(param):
                for key in probe.keys:
                    module = _linear_module(key)
                    if module is None or module in seen:
                        continue
                    seen.add(module)
                    # Layer / expert axes; a packed-experts row holds its expert axis itself.
                    experts = param.per_expert or param.packed_experts
                    grid = len(probe.prefix) + int(param.packed_experts)
                    shape = tuple(probe.global_shapes[0][:grid])
                    if (self.indexed_layers or in_mtp) and not experts:
                        # Megatron keeps a layer axis of one, except on expert grids ([E]).
                        shape = (1, *shape)
                    for index in _grid(shape):
                        objects.append((f"{module}._extra_state", index, shape))
        return objects

    def copies(self) -> dict[str, str]:
        """HF tensors that duplicate a converted one (`ModelFamily.hf_copies`): name -> source."""
        if not self.mtp_layers:
            return {}
        return {
            self.layout.hf_name(copy): self.layout.hf_name(source)
            for copy, source in self.family.hf_copies(self.hf).items()
        }

    def with_variants(self, variants: Mapping[str, str]) -> ConversionPlan:
        """This plan reading / writing the given alternative HF layouts."""
        chosen = self.family.resolve_variants(self.hf, variants)
        return replace(self, params=self.family.active_params(self.hf, chosen), variants=chosen)

    def expected_hf(self) -> dict[str, Shape]:
        return {n: s for u in self.units() for n, s in zip(u.hf_names, u.hf_shapes, strict=True)}

    def ignored_hf(self) -> set[str]:
        names = set()
        for pattern in self.family.ignored_hf(self.hf):
            pattern = self.layout.hf_name(pattern)
            if LAYER in pattern:
                names.update(pattern.replace(LAYER, str(i)) for i in range(self.dims.layers))
            else:
                names.add(pattern)
        return names


def _grid(shape: Sequence[int]) -> Iterator[tuple[int, ...]]:
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _grid(shape[1:]):
            yield (i, *rest)


def plan_conversion(
    family: ModelFamily,
    hf_config: Mapping[str, Any],
    *,
    transformer_impl: str = "local",
    padded_vocab: int | None = None,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    variants: Mapping[str, str] | None = None,
) -> ConversionPlan:
    """The conversion of this config; ``variants`` picks among alternative HF layouts
    (`Param.variant`, e.g. ``{"experts": "per_expert"}``), each group's default otherwise."""
    check_transformer_impl(transformer_impl)
    hf = family.hf(hf_config)
    indexed = family.indexed_layer_keys(hf)  # also validates the config
    dims = family.dims(hf)
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(dims.vocab, make_vocab_size_divisible_by)
    if padded_vocab < dims.vocab:
        raise ValueError(f"padded vocab {padded_vocab} is smaller than vocab_size {dims.vocab}")
    dims = replace(dims, padded_vocab=padded_vocab)
    variants = family.resolve_variants(hf, variants)
    params = family.active_params(hf, variants)
    if not indexed:
        partial = [
            p
            for p in params
            if p.per_layer and not all(p.layers(hf, i) for i in range(dims.layers))
        ]
        if partial:
            raise ValueError(
                f"{family.name}: rows {[p.key(transformer_impl) for p in partial]} apply to some "
                "layers only, but Megatron-Core stacks these layers under one key"
            )
    return ConversionPlan(
        family, hf, dims, transformer_impl, params, indexed, family.layout(hf), variants
    )


def variants_present(plan: ConversionPlan, names: Collection[str]) -> dict[str, str]:
    """Per group of alternative HF layouts, the option whose tensors ``names`` holds: the one
    with all of them, else the one with most (its missing tensors are then reported), else
    the plan's."""
    chosen = dict(plan.variants)
    for group, options in plan.family.variant_groups(plan.hf).items():
        if group == MTP_LAYOUT:
            continue
        found: dict[str, tuple[bool, int]] = {}
        for option in options:
            wanted = {
                name
                for unit in plan.with_variants({**chosen, group: option}).units()
                if unit.param.variant is not None and unit.param.variant[0] == group
                for name in unit.hf_names
            }
            present = sum(name in names for name in wanted)
            found[option] = (present == len(wanted), present)
        best = max(options, key=lambda o: found[o])  # ties keep the earlier (default) option
        if found[best][1] > 0:
            chosen[group] = best
    if MTP_LAYOUT in chosen:
        # Converted when the checkpoint has any MTP tensor (the rest are then reported missing).
        with_mtp = plan.with_variants({**chosen, MTP_LAYOUT: MTP_CONVERTED})
        mtp_names = {n for u in with_mtp.units() if u.param.in_mtp for n in u.hf_names}
        chosen[MTP_LAYOUT] = MTP_CONVERTED if mtp_names & set(names) else MTP_ABSENT
    return chosen


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionSummary:
    direction: str
    tensors: int
    bytes: int
    seconds: float
    output: Path

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        return (
            f"{self.direction}: {self.tensors} tensors, {human_bytes(self.bytes)} in "
            f"{self.seconds:.1f} s ({self.gb_per_s:.2f} GB/s) -> {self.output}"
        )


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
    )


# ---------------------------------------------------------------------------------------------
# Import: HF -> Megatron
# ---------------------------------------------------------------------------------------------


def check_hf_tensors(plan: ConversionPlan, reader: SafetensorsReader) -> None:
    expected = plan.expected_hf()
    ignored = plan.ignored_hf()
    missing = [n for n in expected if n not in reader.tensors]
    unexpected = [
        n
        for n in reader.tensors
        if n not in expected and n not in ignored and not plan.layout.is_carried(n)
    ]
    misshaped = [
        f"{n}: expected {list(shape)}, found {list(reader.tensors[n].shape)}"
        for n, shape in expected.items()
        if n in reader.tensors and reader.tensors[n].shape != shape
    ]
    error = mismatch_error(
        f"{reader.directory} does not match its {plan.family.name} config.json",
        missing,
        unexpected,
        misshaped,
    )
    if error:
        raise error


def _names_by_dtype(dtypes: Mapping[str, torch.dtype]) -> dict[torch.dtype, list[str]]:
    grouped: dict[torch.dtype, list[str]] = {}
    for name, dtype in dtypes.items():
        grouped.setdefault(dtype, []).append(name)
    return grouped


def check_float_tensors(directory: Path, dtypes: Mapping[str, torch.dtype]) -> None:
    """Model weights are floating point: an integer or bool tensor where one belongs (a
    quantised or corrupted checkpoint) is refused by name, never cast by --dtype."""
    bad = [f"{name}: {dtype}" for name, dtype in dtypes.items() if not dtype.is_floating_point]
    if bad:
        raise ConversionError(
            f"{directory} holds non-floating-point weights, which are never converted or cast:\n"
            + _listing("not floating point", bad)
        )


def _source_dtype(plan: ConversionPlan, reader: SafetensorsReader) -> torch.dtype:
    # Rows with a dtype of their own (an fp32 expert bias beside bf16 weights) do not count.
    names = [n for u in plan.units() if u.param.dtype is None for n in u.hf_names]
    grouped = _names_by_dtype({n: reader.tensors[n].dtype for n in names})
    if len(grouped) != 1:
        # The minority dtypes first: they are usually the few tensors that are off.
        parts = [
            f"{dtype} ({len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for dtype, names in sorted(grouped.items(), key=lambda item: len(item[1]))
        ]
        raise ConversionError(
            f"{reader.directory} mixes dtypes {'; '.join(parts)}; choose one with --dtype"
        )
    (dtype,) = grouped
    if dtype not in DTYPE_NAMES:
        raise ConversionError(
            f"{reader.directory} stores {dtype}; choose one of {list(DTYPES)} with --dtype"
        )
    return dtype


def import_hf_checkpoint(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    transformer_impl: str = "local",
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    force: bool = False,
    progress: bool = True,
    fsync: bool = True,
) -> ConversionSummary:
    """HF safetensors directory -> Megatron checkpoint root (tracker + release/ + metadata)."""
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    config_path = hf_dir / CONFIG_FILE
    hf_config = read_json(config_path)
    family = family_for_hf_config(hf_config)
    plan = plan_conversion(
        family,
        HFConfig(hf_config, str(config_path)),
        transformer_impl=transformer_impl,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    output = {"kind": MEGATRON_OUTPUT, "force": force, "inputs": [hf_dir]}
    out_dir = check_output_target(out_dir, **output)
    with SafetensorsReader(hf_dir) as reader:
        plan = plan.with_variants(variants_present(plan, reader.tensors))
        if plan.variants.get(MTP_LAYOUT) == MTP_ABSENT:
            logger.warning(
                "%s declares %d multi-token-prediction layer(s) but holds none of their "
                "tensors (transformers does not save them): converting without MTP",
                config_path,
                family.mtp_layers(plan.hf),
            )
        check_hf_tensors(plan, reader)
        check_float_tensors(hf_dir, {n: reader.tensors[n].dtype for n in plan.expected_hf()})
        target_dtype = DTYPES[dtype] if dtype else _source_dtype(plan, reader)
        copies = exact_copies(plan, reader)
        total = sum(reader.tensors[n].nbytes for n in plan.expected_hf())
        tensors = 0
        with atomic_output_dir(out_dir, fsync=fsync, **output) as tmp:
            writer = TorchDistWriter(tmp / RELEASE, fsync=fsync, file_span=reader.file_span)
            try:
                units = list(plan.units())
                with _progress(total, "import", progress) as bar:
                    for index, unit in enumerate(units):
                        # Disk reads of the next unit overlap this unit's writes.
                        if index + 1 < len(units):
                            reader.prefetch(units[index + 1].hf_names)
                        dtype = unit.param.dtype or target_dtype
                        hf_tensors = [reader.read(n).to(dtype) for n in unit.hf_names]
                        pieces = unit.param.transform.to_megatron_outputs(hf_tensors, plan.dims)
                        for output, row, piece in pieces:
                            offsets = (*unit.prefix, row, *([0] * (piece.dim() - 1)))
                            writer.write_chunk(
                                unit.keys[output],
                                piece.reshape(*[1] * len(unit.prefix), *piece.shape),
                                offsets,
                                unit.global_shapes[output],
                            )
                        tensors += len(hf_tensors)
                        bar.update(sum(reader.tensors[n].nbytes for n in unit.hf_names))
                        del hf_tensors
                        reader.forget_sources()
                for key, offset, shape in plan.extra_state_objects():
                    writer.write_object(key, None, offset, shape)
                writer.finish()
            finally:
                writer.close()
            write_bridge_run_config(tmp / RELEASE)
            write_text_atomically(tmp / TRACKER_FILE, RELEASE, fsync=fsync)
            ModelMetadata(
                family=family.name,
                hf_config=hf_config,
                padded_vocab_size=plan.dims.padded_vocab,
                make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                dtype=DTYPE_NAMES[target_dtype],
                transformer_impl=transformer_impl,
                source=str(hf_dir.absolute()),
                hf_variants=dict(plan.variants),
                hf_copies=tuple(copies),
            ).write(tmp)
            copy_side_files(hf_dir, tmp / HF_FILES_DIR)
            carried = carry_tensors(
                plan, reader, tmp / HF_FILES_DIR / CARRIED_TENSORS_DIR, fsync, set(copies)
            )
    return ConversionSummary(
        "import", tensors + carried, total, time.perf_counter() - start, out_dir
    )


def exact_copies(plan: ConversionPlan, reader: SafetensorsReader) -> list[str]:
    """The copies (`ConversionPlan.copies`) the checkpoint holds equal to their source; the
    others present are carried as they are."""
    exact = []
    for copy, source in plan.copies().items():
        if copy not in reader.tensors:
            continue
        if torch.equal(reader.read(copy), reader.read(source)):
            exact.append(copy)
        else:
            logger.warning(
                "%s differs from %s, which it copies in the model Megatron builds: carried "
                "byte-identical, export writes it back unchanged (not fine-tuned)",
                copy,
                source,
            )
        reader.forget_sources()
    return exact


def carry_tensors(
    plan: ConversionPlan,
    reader: SafetensorsReader,
    directory: Path,
    fsync: bool,
    skip: Collection[str] = (),
) -> int:
    """Store the HF tensors the family carries along (vision tower, copies that differ from
    what they copy) byte-identical; ``skip``: exact copies, which export rewrites."""
    names = [n for n in reader.tensors if plan.layout.is_carried(n) and n not in skip]
    if not names:
        return 0
    # In file order, so the copy streams through each source file once.
    names.sort(key=lambda n: (str(reader.tensors[n].path), reader.tensors[n].start))
    planned = [PlannedTensor(n, reader.tensors[n].dtype, reader.tensors[n].shape) for n in names]
    directory.mkdir(parents=True)
    writer = SafetensorsShardWriter(
        directory, plan_shards(planned, DEFAULT_MAX_SHARD_BYTES), fsync=fsync
    )
    try:
        for name in names:
            writer.write(name, reader.read(name))
            reader.forget_sources()
        writer.finish()
    finally:
        writer.close()
    return len(names)


# ---------------------------------------------------------------------------------------------
# Export: Megatron -> HF
# ---------------------------------------------------------------------------------------------


def check_megatron_tensors(plan: ConversionPlan, reader: TorchDistReader) -> None:
    expected = plan.global_shapes()
    stored = reader.tensor_keys()
    model_keys = {k: v for k, v in stored.items() if not NON_MODEL_KEY_PATTERN.match(k)}
    missing = [k for k in expected if k not in model_keys]
    unexpected = [k for k in model_keys if k not in expected]
    misshaped = [
        f"{k}: expected {list(shape)}, found {list(model_keys[k][0])}"
        for k, shape in expected.items()
        if k in model_keys and model_keys[k][0] != shape
    ]
    error = mismatch_error(
        f"{reader.directory} does not match its {plan.family.name} model",
        missing,
        unexpected,
        misshaped,
    )
    if error:
        raise error


def _stored_padded_vocab(plan: ConversionPlan, reader: TorchDistReader) -> int | None:
    """Rows of the stored embedding: a trainer may have padded for its own TP size."""
    stored = reader.tensor_keys()
    for param in plan.params:
        key = param.key(plan.transformer_impl)
        if isinstance(param.transform, PadVocab) and key in stored:
            return stored[key][0][0]
    return None


def export_megatron_checkpoint(
    megatron_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    iteration: int | str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: bool = True,
    fsync: bool = True,
) -> ConversionSummary:
    """Megatron checkpoint root -> HF directory (config.json, safetensors shards, tokenizer)."""
    start = time.perf_counter()
    root = Path(megatron_dir)
    metadata = read_model_metadata(root, iteration)
    hf_config = dict(metadata.hf_config)
    reader = TorchDistReader(checkpoint_dir(root, iteration))
    plan = plan_conversion(
        metadata.model_family,
        metadata.hf(f"{root / MODEL_METADATA_FILE}:hf_config"),
        transformer_impl=metadata.transformer_impl,
        padded_vocab=metadata.padded_vocab_size,
        variants=metadata.hf_variants,
    )
    stored_vocab = _stored_padded_vocab(plan, reader)
    if stored_vocab is not None and stored_vocab != plan.dims.padded_vocab:
        plan = replace(plan, dims=replace(plan.dims, padded_vocab=stored_vocab))
    check_megatron_tensors(plan, reader)
    stored = reader.tensor_keys()
    check_float_tensors(
        reader.directory, {key: stored[key][1] for unit in plan.units() for key in unit.keys}
    )
    output = {"kind": HF_OUTPUT, "force": force, "inputs": [root]}
    out_dir = check_output_target(out_dir, **output)

    target_dtype = DTYPES[dtype] if dtype else None
    planned = [
        PlannedTensor(name, unit.param.dtype or target_dtype or stored[unit.keys[0]][1], shape)
        for unit in plan.units()
        for name, shape in zip(unit.hf_names, unit.hf_shapes, strict=True)
    ]
    # Exact copies of converted tensors (GLM's MTP embedding / head) come from those tensors.
    sources = {source: unit for unit in plan.units() for source in unit.hf_names}
    copies = {copy: plan.copies()[copy] for copy in metadata.hf_copies}
    by_name = {t.name: t for t in planned}
    planned += [replace(by_name[source], name=copy) for copy, source in copies.items()]
    # Tensors carried along at import go back unchanged (their own dtype, whatever --dtype).
    carried_dir = root / HF_FILES_DIR / CARRIED_TENSORS_DIR
    carried = SafetensorsReader(carried_dir) if carried_dir.is_dir() else None
    if carried is not None:
        planned += [PlannedTensor(n, i.dtype, i.shape) for n, i in carried.tensors.items()]
    total = sum(t.nbytes for t in planned)
    with atomic_output_dir(out_dir, fsync=fsync, **output) as tmp:
        writer = SafetensorsShardWriter(tmp, plan_shards(planned, max_shard_bytes), fsync=fsync)
        try:
            with _progress(total, "export", progress) as bar:
                for unit in plan.units():
                    hf_tensors = _exported_hf_tensors(plan, reader, unit, target_dtype)
                    for name, tensor in zip(unit.hf_names, hf_tensors, strict=True):
                        writer.write(name, tensor)
                        bar.update(tensor.numel() * tensor.element_size())
                    del hf_tensors
                for copy, source in copies.items():
                    unit = sources[source]
                    hf_tensors = _exported_hf_tensors(plan, reader, unit, target_dtype)
                    tensor = hf_tensors[unit.hf_names.index(source)]
                    writer.write(copy, tensor)
                    bar.update(tensor.numel() * tensor.element_size())
                    del hf_tensors
                for name in carried.tensors if carried is not None else ():
                    tensor = carried.read(name)
                    writer.write(name, tensor)
                    bar.update(tensor.numel() * tensor.element_size())
            writer.finish()
        finally:
            writer.close()
            if carried is not None:
                carried.close()
        written_dtype = target_dtype or (planned[0].dtype if planned else None)
        _write_hf_config(tmp / CONFIG_FILE, hf_config, written_dtype)
        side = root / HF_FILES_DIR
        if side.is_dir():
            copy_side_files(side, tmp)
    return ConversionSummary("export", len(planned), total, time.perf_counter() - start, out_dir)


def _exported_hf_tensors(
    plan: ConversionPlan, reader: TorchDistReader, unit: Unit, target_dtype: torch.dtype | None
) -> list[torch.Tensor]:
    """The HF tensors of one unit, read from the Megatron checkpoint."""
    regions = [
        reader.read(
            key,
            (*unit.prefix, *([0] * len(shape))),
            (*([1] * len(unit.prefix)), *shape),
        ).reshape(shape)
        for key, shape in zip(unit.keys, unit.shapes, strict=True)
    ]
    if unit.param.dtype is not None or target_dtype is not None:
        regions = [r.to(unit.param.dtype or target_dtype) for r in regions]
    return unit.param.transform.to_hf_from_outputs(regions, unit.hf_shapes, plan.dims)


def _write_hf_config(path: Path, hf_config: dict[str, Any], dtype: torch.dtype | None) -> None:
    config = dict(hf_config)
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = HF_DTYPE_NAMES[dtype]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
