"""The vocabulary a model family file is written in: config reader, dimensions, parameter rows.

A family (see :mod:`megatron_eaft.models.families`) is data: a function from the HF
``config.json`` to ``TransformerConfig`` keyword arguments, and a tuple of :class:`Param` rows
that say which HF tensors make which Megatron checkpoint tensor, through which
:class:`Transform`. The conversion engine (:mod:`megatron_eaft.convert.engine`) expands the rows
over layers and experts and streams tensors; nothing in here touches Megatron-Core except
:meth:`ModelFamily.transformer_config` and :meth:`ModelFamily.layer_spec`, which import it lazily
so the converter itself never pays for (or needs) a Megatron import.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec

TransformerImpl = Literal["local", "transformer_engine"]
TRANSFORMER_IMPLS: tuple[TransformerImpl, ...] = ("local", "transformer_engine")

Shape = tuple[int, ...]
# A shape written in a family file: dimension names of `Dims` (or products like "2*ffn").
ShapeSpec = tuple[str | int, ...]

logger = logging.getLogger(__name__)

# Megatron-LM's default for --make-vocab-size-divisible-by.
DEFAULT_VOCAB_DIVISOR = 128


class UnsupportedConfigError(ValueError):
    """The HF config asks for something the family (or Megatron-Core) cannot express."""


class HFConfig(Mapping[str, Any]):
    """Read-only view of an HF ``config.json`` with errors that name the file and the key.

    A key the file omits is read from ``defaults`` (a function, called once, on the first
    such read): :meth:`ModelFamily.hf` passes transformers' own reading of the file, so
    an omitted key means what it means to transformers (``Qwen3Config`` defaults
    ``head_dim`` to 128, ``Qwen3MoeConfig`` has no ``head_dim`` and uses hidden / heads).
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        source: str = "config.json",
        defaults: Callable[[], Mapping[str, Any]] | None = None,
        family: str | None = None,
    ):
        if not isinstance(data, Mapping):
            raise TypeError(f"{source}: expected a JSON object, got {type(data).__name__}")
        self._data = dict(data)
        self.source = source
        self._defaults_fn = defaults
        self._defaults: Mapping[str, Any] | None = None
        # The family whose view this is (set by ModelFamily.hf, which is then idempotent).
        self.family = family
        # The whole config.json when this view is a sub-config of it (ModelFamily.hf).
        self.root: dict[str, Any] = self._data

    @property
    def defaults(self) -> Mapping[str, Any]:
        if self._defaults is None:
            self._defaults = dict(self._defaults_fn()) if self._defaults_fn else {}
        return self._defaults

    def __getitem__(self, key: str) -> Any:
        if key in self._data:
            return self._data[key]
        return self.defaults[key]

    def __iter__(self) -> Iterator[str]:
        return iter({**self.defaults, **self._data})

    def __len__(self) -> int:
        return len({**self.defaults, **self._data})

    def to_dict(self) -> dict[str, Any]:
        """What the file says (without defaults)."""
        return dict(self._data)

    def require(self, key: str) -> Any:
        if self.get(key) is None:
            raise ValueError(f"{self.source}: required key {key!r} is missing")
        return self[key]

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if value is None:
            raise ValueError(f"{self.source}: required key {key!r} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{self.source}: {key!r} must be a non-negative integer, got {value!r}"
            )
        return value

    def unsupported(self, key: str, value: Any, why: str) -> UnsupportedConfigError:
        return UnsupportedConfigError(f"{self.source}: unsupported {key}={value!r}: {why}")

    def reject_unless(self, key: str, allowed: Callable[[Any], bool], why: str) -> None:
        """Raise naming ``key`` when its value (possibly absent -> None) is not allowed."""
        value = self.get(key)
        if not allowed(value):
            raise self.unsupported(key, value, why)

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """RoPE settings whether written the transformers-5 way or the older root-level way."""
        params = self._data.get("rope_parameters")
        if params is None:
            legacy = ("rope_scaling", "rope_theta")
            if any(self._data.get(k) is not None for k in legacy):
                params = dict(self._data.get("rope_scaling") or {})
                if "rope_theta" in self._data:
                    params.setdefault("rope_theta", self._data["rope_theta"])
            else:
                params = self.defaults.get("rope_parameters") or {}
        if not isinstance(params, Mapping):
            raise ValueError(f"{self.source}: 'rope_parameters' must be an object, got {params!r}")
        return dict(params)

    def rope_theta(self, default: float) -> float:
        return float(self.rope_parameters.get("rope_theta", default))

    def require_plain_rope(self) -> None:
        """Reject RoPE scaling (YaRN, dynamic NTK, ...) that Megatron's rotary setup here lacks."""
        params = self.rope_parameters
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in (None, "default"):
            key = (
                "rope_parameters"
                if self._data.get("rope_parameters") is not None
                else "rope_scaling"
            )
            raise self.unsupported(
                f"{key}.rope_type", rope_type, "only plain RoPE (rope_type 'default') converts"
            )

    def require_full_attention(self) -> None:
        """Reject sliding-window attention: Megatron's local attention here is full causal."""
        if self._data.get("use_sliding_window"):
            raise self.unsupported(
                "use_sliding_window", True, "sliding-window attention is not supported"
            )
        layer_types = self._data.get("layer_types")
        if layer_types is not None:
            other = sorted({t for t in layer_types if t != "full_attention"})
            if other:
                raise self.unsupported(
                    "layer_types", other, "only 'full_attention' layers are supported"
                )


def transformers_reading(class_name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of transformers' config class ``class_name`` as it reads ``data``.

    Keys the file omits get the class's defaults, and derived ones are derived the class's way
    (``layer_types`` from ``full_attention_interval`` and ``num_hidden_layers``, a legacy
    root-level ``partial_rotary_factor`` into ``rope_parameters``). Only configuration is
    built, never a model. A file the class refuses gives no defaults: the family's own checks
    then name the offending key.
    """
    key = json.dumps(dict(data), sort_keys=True, default=str)
    return dict(_transformers_reading(class_name, key))


@functools.lru_cache(maxsize=64)
def _transformers_reading(class_name: str, data_json: str) -> tuple[tuple[str, Any], ...]:
    import transformers

    config_class = getattr(transformers, class_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reading = config_class(**json.loads(data_json)).to_dict()
    except Exception as exc:  # transformers raises many kinds for bad input
        logger.debug("%s refuses the config (%s); no defaults from it", class_name, exc)
        return ()
    return tuple(reading.items())


@dataclass(frozen=True)
class Dims:
    """Sizes that family shape specs refer to by name."""

    layers: int
    hidden: int
    ffn: int
    vocab: int
    heads: int
    groups: int
    head_dim: int
    experts: int = 0
    moe_ffn: int = 0
    # Rows of the embedding / output layer as stored; set by the engine (>= vocab).
    padded_vocab: int = 0
    # Further sizes a family's shapes name (e.g. Gated DeltaNet head counts), by name.
    extra: Mapping[str, int] = field(default_factory=dict)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.groups * self.head_dim

    def resolve(self, spec: ShapeSpec) -> Shape:
        return tuple(self._resolve_dim(d) for d in spec)

    def _resolve_dim(self, dim: str | int) -> int:
        if isinstance(dim, int):
            return dim
        value = 1
        for factor in dim.split("*"):
            factor = factor.strip()
            if factor.isdigit():
                value *= int(factor)
            elif factor in self.extra:
                value *= int(self.extra[factor])
            else:
                value *= int(getattr(self, factor))
        return value


def padded_vocab_size(vocab: int, divisor: int = DEFAULT_VOCAB_DIVISOR, tp: int = 1) -> int:
    """Megatron-LM's padding: round up to a multiple of ``divisor * tp``."""
    if divisor < 1 or tp < 1:
        raise ValueError(f"vocab divisor and TP must be >= 1, got {divisor} and {tp}")
    multiple = divisor * tp
    return math.ceil(vocab / multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Transforms: HF tensors <-> one Megatron tensor (per layer / expert).
# ---------------------------------------------------------------------------------------------

# A piece of a Megatron tensor: (row offset along dim 0, tensor). Pieces let a transform hand the
# writer HF tensors untouched (fc1 = [gate; up] is two pieces, no concatenation copy).
Piece = tuple[int, torch.Tensor]


class Transform:
    """How HF tensors map to one Megatron tensor; subclasses override the three methods.

    A transform making several Megatron tensors from its HF tensors (a row of the table with a
    tuple of keys) overrides the ``*_outputs`` methods instead.
    """

    name = "transform"

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        raise NotImplementedError

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Dims) -> list[Piece]:
        raise NotImplementedError

    def to_hf(
        self, megatron: torch.Tensor, hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- several Megatron tensors: (output index, row, tensor) pieces --------------------

    def megatron_shapes(self, hf_shapes: Sequence[Shape], dims: Dims) -> tuple[Shape, ...]:
        return (tuple(self.megatron_shape(hf_shapes, dims)),)

    def to_megatron_outputs(
        self, hf: Sequence[torch.Tensor], dims: Dims
    ) -> list[tuple[int, int, torch.Tensor]]:
        return [(0, row, tensor) for row, tensor in self.to_megatron(hf, dims)]

    def to_hf_from_outputs(
        self, megatron: Sequence[torch.Tensor], hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        (tensor,) = megatron
        return self.to_hf(tensor, hf_shapes, dims)

    def __repr__(self) -> str:
        return self.name


class Copy(Transform):
    """One HF tensor is the Megatron tensor."""

    name = "copy"

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        (shape,) = hf_shapes
        return shape

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Dims) -> list[Piece]:
        (tensor,) = hf
        return [(0, tensor)]

    def to_hf(
        self, megatron: torch.Tensor, hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        return [megatron]


class ConcatRows(Transform):
    """Megatron's tensor is the HF tensors stacked along dim 0, e.g. fc1 = [gate; up].

    Megatron's SwiGLU fc1 is stored whole as cat(gate, up) whatever the TP size: its sharded
    state dict splits each rank's [gate_r; up_r] back into the two global halves.
    """

    name = "concat_rows"

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        first = hf_shapes[0]
        return (sum(s[0] for s in hf_shapes), *first[1:])

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Dims) -> list[Piece]:
        pieces, row = [], 0
        for tensor in hf:
            pieces.append((row, tensor))
            row += tensor.shape[0]
        return pieces

    def to_hf(
        self, megatron: torch.Tensor, hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        return list(torch.split(megatron, [s[0] for s in hf_shapes], dim=0))


class InterleaveQKV(Transform):
    """q, k, v -> Megatron's fused QKV, grouped per query group.

    With ``g`` query groups of ``h/g`` heads each, Megatron lays out rows as
    ``[q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...]`` so that a TP
    rank's contiguous slice holds whole groups. A plain cat(q, k, v) has the same shape and
    "works" until attention mixes the wrong heads.
    """

    name = "interleave_qkv"

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        q, k, v = hf_shapes
        return (q[0] + k[0] + v[0], *q[1:])

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Dims) -> list[Piece]:
        q, k, v = hf
        g, d = dims.groups, dims.head_dim
        rest = q.shape[1:]
        fused = torch.cat(
            (q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)), dim=1
        )
        return [(0, fused.reshape(-1, *rest))]

    def to_hf(
        self, megatron: torch.Tensor, hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        g, d = dims.groups, dims.head_dim
        rest = megatron.shape[1:]
        grouped = megatron.reshape(g, -1, *rest)
        q_rows = grouped.shape[1] - 2 * d
        q, k, v = torch.split(grouped, [q_rows, d, d], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


class PadVocab(Transform):
    """Embedding / output rows padded with zeros to the padded vocab; cut back on export."""

    name = "pad_vocab"

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        (shape,) = hf_shapes
        return (dims.padded_vocab, *shape[1:])

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Dims) -> list[Piece]:
        (tensor,) = hf
        pieces: list[Piece] = [(0, tensor)]
        extra = dims.padded_vocab - tensor.shape[0]
        if extra > 0:
            pieces.append((tensor.shape[0], tensor.new_zeros((extra, *tensor.shape[1:]))))
        return pieces

    def to_hf(
        self, megatron: torch.Tensor, hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        (shape,) = hf_shapes
        return [megatron[: shape[0]]]


class InterleaveGatedQKV(InterleaveQKV):
    """Gated attention: HF q_proj (per head [q_h; gate_h]), k, v -> Megatron's fused QKV.

    With ``attention_output_gate`` Megatron lays out each query group as
    ``[q heads; gate heads; k; v]`` (``SelfAttention.get_query_key_value_tensors``); HF's
    ``q_proj`` holds 2 * heads * head_dim rows, head by head, each ``[query; gate]``.
    """

    name = "interleave_gated_qkv"

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Dims) -> list[Piece]:
        q_and_gate, k, v = hf
        g, d, rest = dims.groups, dims.head_dim, q_and_gate.shape[1:]
        per_head = q_and_gate.reshape(dims.heads, 2, d, *rest)
        query = per_head[:, 0].reshape(g, -1, *rest)
        gate = per_head[:, 1].reshape(g, -1, *rest)
        fused = torch.cat(
            (query, gate, k.reshape(g, d, *rest), v.reshape(g, d, *rest)), dim=1
        ).reshape(-1, *rest)
        return [(0, fused)]

    def to_hf(
        self, megatron: torch.Tensor, hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        g, d, rest = dims.groups, dims.head_dim, megatron.shape[1:]
        q_rows = dims.heads // g * d
        query, gate, k, v = torch.split(megatron.reshape(g, -1, *rest), [q_rows, q_rows, d, d], 1)
        per_head = torch.stack(
            (query.reshape(dims.heads, d, *rest), gate.reshape(dims.heads, d, *rest)), dim=1
        )
        return [per_head.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


class SplitRows(Transform):
    """One HF tensor -> several Megatron tensors, by consecutive row sections along dim 0.

    ``sections`` are `Dims` names of each section's rows (e.g. Gated DeltaNet's
    ``in_proj_qkv`` = [query; key; value] -> ``in_proj.weight.query`` / ``.key`` / ``.value``).
    The row's ``megatron`` keys name the sections in the same order. Export concatenates them.
    """

    def __init__(self, *sections: str):
        if len(sections) < 2:
            raise ValueError("SplitRows needs at least two sections")
        self.sections = sections
        self.name = f"split_rows({', '.join(sections)})"

    def _rows(self, dims: Dims) -> list[int]:
        return [dims.resolve((s,))[0] for s in self.sections]

    def megatron_shapes(self, hf_shapes: Sequence[Shape], dims: Dims) -> tuple[Shape, ...]:
        (shape,) = hf_shapes
        rows = self._rows(dims)
        if sum(rows) != shape[0]:
            raise ValueError(f"{self.name}: sections {rows} do not add up to {shape[0]} rows")
        return tuple((r, *shape[1:]) for r in rows)

    def to_megatron_outputs(
        self, hf: Sequence[torch.Tensor], dims: Dims
    ) -> list[tuple[int, int, torch.Tensor]]:
        (tensor,) = hf
        parts = torch.split(tensor, self._rows(dims), dim=0)
        return [(index, 0, part) for index, part in enumerate(parts)]

    def to_hf_from_outputs(
        self, megatron: Sequence[torch.Tensor], hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        return [torch.cat(list(megatron), dim=0)]


class NormOffset(Transform):
    """A norm weight stored with an offset: Megatron's zero-centred gamma is HF's ``w - 1``.

    Applies where HF keeps a plain ``w * x`` norm and Megatron (with
    ``layernorm_zero_centered_gamma``) computes ``(1 + w) * x``. The offset is computed in
    float64 and rounded once. Export recovers HF's value exactly whenever rounding ``w - 1``
    lost nothing, which holds for every ``w >= 0.5`` (Sterbenz); below that the exported value
    may differ by one unit in the last place.
    """

    def __init__(self, offset: float):
        self.offset = offset
        self.name = f"norm_offset({offset:+g})"

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        (shape,) = hf_shapes
        return shape

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Dims) -> list[Piece]:
        (tensor,) = hf
        return [(0, (tensor.double() + self.offset).to(tensor.dtype))]

    def to_hf(
        self, megatron: torch.Tensor, hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        return [(megatron.double() - self.offset).to(megatron.dtype)]


class PackedExperts(Transform):
    """HF tensors holding every expert of a layer on a leading expert axis ([E, ...]) ->
    Megatron's expert tensor of that layer, which has the same leading expert axis.

    ``inner`` maps one expert's slices (``COPY`` for a fused ``gate_up_proj`` that is already
    [gate; up], ``CONCAT_ROWS`` for separate packed ``gate_proj`` / ``up_proj``). A row with this
    transform has ``{layer}`` but no ``{expert}`` in its HF names: one unit per layer moves all
    experts (peak memory: one HF tensor, as for any row), and the Megatron keys, shapes and
    ``_extra_state`` grid equal those of the per-expert row it replaces.
    """

    def __init__(self, inner: Transform):
        self.inner = inner
        self.name = f"packed_experts({inner.name})"

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        leading = {s[0] for s in hf_shapes if s}
        if leading != {dims.experts}:
            raise ValueError(
                f"{self.name}: HF shapes {list(hf_shapes)} must lead with the expert axis "
                f"({dims.experts})"
            )
        inner = self.inner.megatron_shape([s[1:] for s in hf_shapes], dims)
        return (dims.experts, *inner)

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Dims) -> list[Piece]:
        if isinstance(self.inner, Copy):
            return [(0, hf[0])]
        shape = self.megatron_shape([tuple(t.shape) for t in hf], dims)
        out = hf[0].new_empty(shape)
        for expert in range(dims.experts):
            for row, piece in self.inner.to_megatron([t[expert] for t in hf], dims):
                out[expert, row : row + piece.shape[0]] = piece
        return [(0, out)]

    def to_hf(
        self, megatron: torch.Tensor, hf_shapes: Sequence[Shape], dims: Dims
    ) -> list[torch.Tensor]:
        if isinstance(self.inner, Copy):
            return [megatron]
        inner_shapes = [s[1:] for s in hf_shapes]
        per_expert = [self.inner.to_hf(m, inner_shapes, dims) for m in megatron]
        return [torch.stack(parts) for parts in zip(*per_expert, strict=True)]


COPY = Copy()
CONCAT_ROWS = ConcatRows()
INTERLEAVE_QKV = InterleaveQKV()
INTERLEAVE_GATED_QKV = InterleaveGatedQKV()
PACKED_EXPERTS = PackedExperts(COPY)
PAD_VOCAB = PadVocab()
ZERO_CENTERED_NORM = NormOffset(-1.0)


# ---------------------------------------------------------------------------------------------
# Rows of a family table.
# ---------------------------------------------------------------------------------------------

LAYER = "{layer}"
EXPERT = "{expert}"
LAYERS_PREFIX = "decoder.layers."
# Multi-token prediction (MTP) layers: ``{mtp}`` is the MTP layer's index (0-based in Megatron
# keys; in HF names offset by the family's ``mtp_hf_offset``, GLM numbers them after the decoder).
MTP = "{mtp}"
MTP_PREFIX = "mtp.layers.{mtp}."
# The MTP layer's inner decoder layer as megatron-core 0.19.2 saves it: the module is
# ``mtp_model_layer``, its sharded keys keep the older name ``transformer_layer``.
MTP_LAYER_PREFIX = MTP_PREFIX + "transformer_layer."
# Whether a checkpoint holds the MTP layers its config declares (transformers' save_pretrained
# drops them): a group of alternative HF layouts of its own, decided at import from the tensors
# present, recorded in the metadata; "absent" converts, trains and exports without MTP.
MTP_LAYOUT = "mtp"
MTP_CONVERTED = "converted"
MTP_ABSENT = "absent"


def always(hf: HFConfig) -> bool:
    return True


def every_layer(hf: HFConfig, layer: int) -> bool:
    return True


@dataclass(frozen=True)
class Param:
    """One Megatron checkpoint tensor (or several) and the HF tensors it is made of.

    megatron: the sharded-checkpoint key, as ``GPTModel.sharded_state_dict()`` names it, with
        no layer index: homogeneous layers are stacked on a leading axis, and where
        Megatron-Core writes one key per layer (layers that differ) the engine inserts the
        index (``decoder.layers.3.``). A dict ``{transformer_impl: key}`` where the local and
        Transformer Engine specs disagree; a tuple of keys for a transform that makes several
        Megatron tensors from the HF tensors (``SplitRows``).
    hf: HF tensor name(s); ``{layer}`` and ``{expert}`` are expanded by the engine. Per-layer
        rows get a leading layer axis in Megatron, per-expert rows a [layer, expert] prefix.
    shapes: each HF tensor's shape in `Dims` names, checked before any data is read.
    transform: how the HF tensors become the Megatron tensor and back.
    when: whether the row applies to this config (e.g. only with untied embeddings).
    layers: for per-layer rows, which layers have it (e.g. only the linear-attention ones).
    dtype: the dtype the tensor keeps in both checkpoints whatever the others' (``--dtype``
        included), where Megatron keeps it so (the router's fp32 ``expert_bias``).
    variant: ``(group, option)`` for a row that is one of several HF layouts of the same
        Megatron tensors (``("experts", "packed")`` / ``("experts", "per_expert")``). Import
        takes, per group, the option whose HF tensors the checkpoint has and records it in
        the model metadata; export writes that option back. A group's first option in the
        table is its default (a trainer-made checkpoint's export, a checkpoint with neither).
    """

    megatron: str | Mapping[str, str] | tuple[str, ...]
    hf: str | tuple[str, ...]
    shapes: ShapeSpec | tuple[ShapeSpec, ...]
    transform: Transform = COPY
    when: Callable[[HFConfig], bool] = always
    layers: Callable[[HFConfig, int], bool] = every_layer
    dtype: torch.dtype | None = None
    variant: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        names = self.hf_names
        if not names:
            raise ValueError(f"{self.megatron}: no HF tensor names")
        if len(self.hf_shapes) != len(names):
            raise ValueError(
                f"{self.megatron}: {len(names)} HF names but shapes for {len(self.hf_shapes)}"
            )
        if isinstance(self.megatron, str):
            keys = [self.megatron]
        elif isinstance(self.megatron, tuple):
            keys = list(self.megatron)
        else:
            keys = list(self.megatron.values())
        if self.per_layer and self.per_mtp:
            raise ValueError(f"{self.megatron}: a row is per decoder layer or per MTP layer")
        for key in keys:
            if self.per_mtp != key.startswith(MTP_PREFIX):
                raise ValueError(
                    f"{key}: MTP rows (HF names with {MTP}) must have keys under "
                    f"{MTP_PREFIX!r} and only they"
                )
            if self.per_layer != key.startswith(LAYERS_PREFIX):
                raise ValueError(
                    f"{key}: per-layer rows (HF names with {LAYER}) must have keys under "
                    f"{LAYERS_PREFIX!r} and only they"
                )
        if (self.per_expert or self.packed_experts) and not (self.per_layer or self.per_mtp):
            raise ValueError(f"{self.megatron}: an expert row must also be per layer")
        if self.per_expert and self.packed_experts:
            raise ValueError(
                f"{self.megatron}: a packed-experts row moves all experts at once; its HF "
                f"names take no {EXPERT}"
            )
        if any((EXPERT in n) != self.per_expert for n in names):
            raise ValueError(f"{self.megatron}: either all or none of the HF names use {EXPERT}")

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)

    @property
    def hf_shapes(self) -> tuple[ShapeSpec, ...]:
        if self.shapes and all(isinstance(s, tuple) for s in self.shapes):
            return tuple(self.shapes)  # type: ignore[arg-type]
        return (self.shapes,)  # type: ignore[return-value]

    @property
    def per_layer(self) -> bool:
        return LAYER in self.hf_names[0]

    @property
    def in_mtp(self) -> bool:
        """A tensor of the MTP layers (Megatron keys ``mtp.``)."""
        if isinstance(self.megatron, str):
            keys: Sequence[str] = (self.megatron,)
        elif isinstance(self.megatron, tuple):
            keys = self.megatron
        else:
            keys = tuple(self.megatron.values())
        return any(k.startswith("mtp.") for k in keys)

    @property
    def per_mtp(self) -> bool:
        """A row of each MTP layer (HF names with ``{mtp}``)."""
        return MTP in self.hf_names[0]

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.hf_names[0]

    @property
    def packed_experts(self) -> bool:
        """HF tensors with every expert on a leading axis (`PackedExperts`)."""
        return isinstance(self.transform, PackedExperts)

    def keys(self, transformer_impl: str) -> tuple[str, ...]:
        """The Megatron keys this row makes, in the transform's output order."""
        if isinstance(self.megatron, str):
            return (self.megatron,)
        if isinstance(self.megatron, tuple):
            return self.megatron
        try:
            return (self.megatron[transformer_impl],)
        except KeyError:
            raise ValueError(
                f"no checkpoint key for transformer_impl={transformer_impl!r} in {dict(self.megatron)}"
            ) from None

    def key(self, transformer_impl: str) -> str:
        """The one Megatron key of this row (the first of several)."""
        return self.keys(transformer_impl)[0]


def tied_embeddings(hf: HFConfig) -> bool:
    return bool(hf.get("tie_word_embeddings", False))


def untied_embeddings(hf: HFConfig) -> bool:
    return not tied_embeddings(hf)


# The two HF layouts of routed experts (`Param.variant` group "experts").
EXPERT_LAYOUT = "experts"
PACKED = "packed"
PER_EXPERT = "per_expert"
ROUTED_EXPERTS_KEY = "decoder.layers.mlp.experts.experts."


def routed_expert_rows(
    hf_experts: str,
    *,
    layers: Callable[[HFConfig, int], bool] = every_layer,
    default: str = PACKED,
) -> tuple[Param, ...]:
    """Megatron's routed-expert ``linear_fc1`` / ``linear_fc2`` from either HF layout.

    ``hf_experts`` is the HF prefix of a layer's experts (``model.layers.{layer}.mlp.experts.``).
    Packed (transformers' in-memory layout, and the published Qwen3.5 / Qwen3.6 MoE files):
    ``gate_up_proj`` [E, 2*moe_ffn, hidden] (each expert [gate; up]) and ``down_proj``
    [E, hidden, moe_ffn], which are Megatron's tensors as they are. Per expert (what
    transformers 5 ``save_pretrained`` writes for these models, and older MoE checkpoints):
    ``{expert}.gate_proj.weight`` / ``up_proj`` / ``down_proj``. Import reads whichever the
    checkpoint has; ``default`` is the layout assumed where none was recorded.
    """
    if default not in (PACKED, PER_EXPERT):
        raise ValueError(f"default must be {PACKED!r} or {PER_EXPERT!r}, got {default!r}")
    fc1, fc2 = ROUTED_EXPERTS_KEY + "linear_fc1.weight", ROUTED_EXPERTS_KEY + "linear_fc2.weight"
    packed = (
        Param(
            fc1,
            hf_experts + "gate_up_proj",
            ("experts", "2*moe_ffn", "hidden"),
            PACKED_EXPERTS,
            layers=layers,
            variant=(EXPERT_LAYOUT, PACKED),
        ),
        Param(
            fc2,
            hf_experts + "down_proj",
            ("experts", "hidden", "moe_ffn"),
            PACKED_EXPERTS,
            layers=layers,
            variant=(EXPERT_LAYOUT, PACKED),
        ),
    )
    one = hf_experts + EXPERT + "."
    per_expert = (
        Param(
            fc1,
            (one + "gate_proj.weight", one + "up_proj.weight"),
            (("moe_ffn", "hidden"), ("moe_ffn", "hidden")),
            CONCAT_ROWS,
            layers=layers,
            variant=(EXPERT_LAYOUT, PER_EXPERT),
        ),
        Param(
            fc2,
            one + "down_proj.weight",
            ("hidden", "moe_ffn"),
            layers=layers,
            variant=(EXPERT_LAYOUT, PER_EXPERT),
        ),
    )
    return packed + per_expert if default == PACKED else per_expert + packed


def _mtp_key(key: str) -> str:
    if not key.startswith(LAYERS_PREFIX):
        raise ValueError(f"{key}: only decoder-layer rows become MTP-layer rows")
    return MTP_LAYER_PREFIX + key[len(LAYERS_PREFIX) :]


def mtp_layer_rows(
    decoder_rows: Sequence[Param], hf_decoder_prefix: str, hf_mtp_prefix: str
) -> tuple[Param, ...]:
    """The rows of a decoder layer, as the rows of each MTP layer's inner decoder layer.

    Keys move from ``decoder.layers.`` to ``mtp.layers.{mtp}.transformer_layer.``, HF names
    from ``hf_decoder_prefix`` (``model.layers.{layer}.``) to ``hf_mtp_prefix``
    (``mtp.layers.{mtp}.``), with the same shapes and transforms. Layer selection is dropped
    (pass the rows of the layer kind the MTP layer is); alternative HF layouts become groups of
    their own (``mtp_experts``): a checkpoint may store its MTP experts unlike its decoder's.
    """
    rows = []
    for row in decoder_rows:
        if isinstance(row.megatron, str):
            megatron: str | Mapping[str, str] | tuple[str, ...] = _mtp_key(row.megatron)
        elif isinstance(row.megatron, tuple):
            megatron = tuple(_mtp_key(k) for k in row.megatron)
        else:
            megatron = {impl: _mtp_key(k) for impl, k in row.megatron.items()}
        names = []
        for name in row.hf_names:
            if not name.startswith(hf_decoder_prefix):
                raise ValueError(f"{name}: not under the decoder prefix {hf_decoder_prefix!r}")
            names.append(hf_mtp_prefix + name[len(hf_decoder_prefix) :])
        variant = (f"mtp_{row.variant[0]}", row.variant[1]) if row.variant else None
        rows.append(
            replace(
                row,
                megatron=megatron,
                hf=tuple(names) if len(names) > 1 else names[0],
                layers=every_layer,
                variant=variant,
            )
        )
    return tuple(rows)


def mtp_head_rows(
    hf_mtp_prefix: str,
    names: Mapping[str, str],
    *,
    megatron_prefix: str = MTP_PREFIX,
    when: Callable[[HFConfig], bool] = always,
) -> tuple[Param, ...]:
    """Each MTP layer's own tensors: the embedding and hidden-state norms (``enorm`` /
    ``hnorm``), the projection of their concatenation [embedding; hidden] (``eh_proj``,
    [hidden, 2 * hidden]) and the norm before the shared output layer (``final_layernorm``).
    ``names`` maps those four Megatron names to the HF names under ``hf_mtp_prefix``. The
    norms are copies: Megatron builds them like the decoder's (zero-centred where the
    decoder's are), as HF does. ``megatron_prefix``: ``mtp.layers.0.`` (with ``when``) for a
    layout whose single MTP layer's names have no index (Qwen3.5's ``mtp.fc``)."""
    shapes = {"eh_proj": ("hidden", "2*hidden")}
    return tuple(
        Param(
            f"{megatron_prefix}{megatron}.weight",
            hf_mtp_prefix + names[megatron],
            shapes.get(megatron, ("hidden",)),
            when=when,
        )
        for megatron in ("enorm", "hnorm", "eh_proj", "final_layernorm")
    )


# ---------------------------------------------------------------------------------------------
# The family itself.
# ---------------------------------------------------------------------------------------------


def llama_like_dims(hf: HFConfig) -> Dims:
    """Dims for decoders whose config uses the Llama/Qwen key names."""
    heads = hf.integer("num_attention_heads")
    hidden = hf.integer("hidden_size")
    if heads == 0:
        raise ValueError(f"{hf.source}: 'num_attention_heads' must be positive")
    groups = hf.integer("num_key_value_heads", heads)
    if groups == 0 or heads % groups:
        raise ValueError(
            f"{hf.source}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={groups}"
        )
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(
                f"{hf.source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                "and 'head_dim' is not given"
            )
        head_dim = hidden // heads
    experts = hf.get("num_experts", hf.get("num_local_experts")) or 0
    return Dims(
        layers=hf.integer("num_hidden_layers"),
        hidden=hidden,
        ffn=hf.integer("intermediate_size", 0),
        vocab=hf.integer("vocab_size"),
        heads=heads,
        groups=groups,
        head_dim=hf.integer("head_dim", head_dim),
        experts=int(experts),
        moe_ffn=hf.integer("moe_intermediate_size", 0),
    )


def rope_gpt_model_kwargs(hf: HFConfig, default_rope_theta: float = 10000.0) -> dict[str, Any]:
    """GPTModel constructor arguments of a RoPE decoder (rotary settings, tying, length)."""
    return {
        "position_embedding_type": "rope",
        "rotary_base": hf.rope_theta(default_rope_theta),
        "rotary_percent": 1.0,
        "share_embeddings_and_output_weights": tied_embeddings(hf),
        "max_sequence_length": hf.integer("max_position_embeddings", 4096),
    }


def megatron_gpt_layer_spec(config: TransformerConfig, transformer_impl: str) -> ModuleSpec:
    """Megatron-Core's own GPT layer spec (local or Transformer Engine) for ``config``."""
    check_transformer_impl(transformer_impl)
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_impl == "local":
        return gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
            normalization=config.normalization,
        )
    if not gpt_layer_specs.HAVE_TE:
        raise RuntimeError(
            "transformer_impl='transformer_engine' needs Transformer Engine, which is not "
            "importable here; use transformer_impl='local'"
        )
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
    )


def check_transformer_impl(transformer_impl: str) -> None:
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(
            f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}"
        )


@dataclass(frozen=True)
class HFLayout:
    """Where an HF architecture keeps the language model the family table describes.

    text_config: the ``config.json`` key of the language model's settings when they are a
        sub-config (vision-language checkpoints: ``text_config``); ``top_level`` keys are
        still read from the root (``tie_word_embeddings``, which transformers reads there).
    renames: (table prefix, this layout's prefix) pairs applied to HF tensor names, e.g.
        ``("model.", "model.language_model.")``.
    carried: prefixes of HF tensors that are not converted but carried along byte-identical
        (a vision tower, MTP heads): import stores them beside the Megatron checkpoint and
        export writes them back.
    """

    text_config: str | None = None
    top_level: tuple[str, ...] = ("tie_word_embeddings",)
    renames: tuple[tuple[str, str], ...] = ()
    carried: tuple[str, ...] = ()

    def hf_name(self, table_name: str) -> str:
        for prefix, replacement in self.renames:
            if table_name.startswith(prefix):
                return replacement + table_name[len(prefix) :]
        return table_name

    def is_carried(self, hf_name: str) -> bool:
        return hf_name.startswith(self.carried) if self.carried else False


PLAIN_LAYOUT = HFLayout()


def indexed_layer_keys(config_kwargs: Mapping[str, Any]) -> bool:
    """Whether Megatron-Core writes one checkpoint key per layer (``decoder.layers.{i}.``).

    Mirrors ``TransformerBlock.sharded_state_dict`` (megatron-core 0.19): layers that differ
    (an MoE layer frequency or a linear-attention frequency above 1, or given as a list)
    are saved per layer, without the stacked layer axis.
    """
    for name in ("moe_layer_freq", "linear_attention_freq"):
        value = config_kwargs.get(name)
        if isinstance(value, list) or (isinstance(value, int) and value > 1):
            return True
    return bool(config_kwargs.get("heterogeneous_block_specs"))


@dataclass(frozen=True)
class ModelFamily:
    """A model family: config mapping + parameter table (+ layer spec, when not Megatron's).

    name: short name stored in converted checkpoints' metadata ("qwen3").
    architectures: HF ``architectures`` entries this family converts.
    config: HF config -> TransformerConfig keyword arguments. Raise
        :class:`UnsupportedConfigError` (``hf.unsupported(...)``) for options it cannot express.
    params: the parameter table.
    dims: HF config -> sizes the table's shapes use.
    gpt_model_kwargs: HF config -> GPTModel arguments (rotary settings, tied embeddings, ...).
    layer_spec_fn: (TransformerConfig, transformer_impl) -> layer ModuleSpec.
    block_spec_fn: (TransformerConfig, transformer_impl, vp_stage) -> decoder block spec
        (``TransformerBlockSubmodules``), for decoders whose layers differ; used instead of
        ``layer_spec_fn`` when given.
    ignored_hf: HF tensor names (with {layer}) that may be present and are not converted, e.g.
        ``lm_head.weight`` saved alongside tied embeddings.
    hf_config_class: transformers' config class for the (text) config; keys a config.json
        omits are read as that class reads them (its defaults, its derived fields).
    layouts: per architecture, where the language model sits (`HFLayout`); default: plain.
    megatron_config_class: the ``megatron.core.transformer`` config class to build
        (``TransformerConfig``; ``MLATransformerConfig`` for multi-latent attention).
    carried_hf: HF config -> further prefixes of tensors carried through byte-identical, for
        those the config places (GLM's copies of the embedding and output layer in its MTP
        layers).
    mtp_layers: HF config -> how many multi-token-prediction layers it has (Megatron's
        ``mtp_num_layers``); the rows with ``{mtp}`` are repeated for each.
    mtp_hf_offset: HF config -> the HF index of MTP layer 0 (``{mtp}`` in HF names): 0 where
        HF keeps them apart (``mtp.layers.0.``), ``num_hidden_layers`` where it numbers them
        after the decoder's (``model.layers.{num_hidden_layers}.``).
    mtp_layer_spec_fn: (TransformerConfig, transformer_impl) -> the layer spec of the MTP
        layer's inner decoder layer; required when ``mtp_layers`` can be positive.
    hf_copies: HF config -> {HF name: HF name of the tensor it duplicates}, for tensors HF
        stores twice and Megatron once (GLM's MTP layers hold copies of the embedding and
        output layer). Import checks a copy equals its source (else carries it as it is);
        export writes it from the exported source, so it follows fine-tuning.
    """

    name: str
    architectures: tuple[str, ...]
    config: Callable[[HFConfig], dict[str, Any]]
    params: tuple[Param, ...]
    dims: Callable[[HFConfig], Dims] = llama_like_dims
    gpt_model_kwargs: Callable[[HFConfig], dict[str, Any]] = rope_gpt_model_kwargs
    layer_spec_fn: Callable[[Any, str], Any] = megatron_gpt_layer_spec
    block_spec_fn: Callable[[Any, str, int | None], Any] | None = None
    ignored_hf: Callable[[HFConfig], tuple[str, ...]] = field(default=lambda hf: ())
    hf_config_class: str | None = None
    layouts: Mapping[str, HFLayout] = field(default_factory=dict)
    megatron_config_class: str = "TransformerConfig"
    carried_hf: Callable[[HFConfig], tuple[str, ...]] = field(default=lambda hf: ())
    mtp_layers: Callable[[HFConfig], int] = field(default=lambda hf: 0)
    mtp_hf_offset: Callable[[HFConfig], int] = field(default=lambda hf: 0)
    mtp_layer_spec_fn: Callable[[Any, str], Any] | None = None
    hf_copies: Callable[[HFConfig], Mapping[str, str]] = field(default=lambda hf: {})

    def _architecture_layout(self, raw: Mapping[str, Any]) -> HFLayout:
        for architecture in raw.get("architectures") or ():
            if architecture in self.layouts:
                return self.layouts[architecture]
        return PLAIN_LAYOUT

    def layout(self, hf_config: Mapping[str, Any] | HFConfig) -> HFLayout:
        """The `HFLayout` of the config's architecture (read from the file's root), with the
        tensors the config itself says are carried (``carried_hf``)."""
        raw = hf_config.root if isinstance(hf_config, HFConfig) else hf_config
        layout = self._architecture_layout(raw)
        carried = tuple(layout.hf_name(p) for p in self.carried_hf(self.hf(hf_config)))
        return replace(layout, carried=(*layout.carried, *carried)) if carried else layout

    def hf(self, hf_config: Mapping[str, Any] | HFConfig) -> HFConfig:
        """The language model's config as this family reads it (sub-config, defaults)."""
        if isinstance(hf_config, HFConfig) and hf_config.family == self.name:
            return hf_config
        if isinstance(hf_config, HFConfig):
            raw, source = hf_config.root, hf_config.source
        else:
            raw, source = dict(hf_config), "config.json"
        layout = self._architecture_layout(raw)
        data = raw
        if layout.text_config is not None:
            text = raw.get(layout.text_config)
            if not isinstance(text, Mapping):
                raise ValueError(
                    f"{source}: {raw.get('architectures')} keeps the language model's settings "
                    f"under {layout.text_config!r}, which is missing or not an object"
                )
            data = {**text, **{k: raw[k] for k in layout.top_level if k in raw}}
            source = f"{source}:{layout.text_config}"
        defaults = (
            functools.partial(transformers_reading, self.hf_config_class, data)
            if self.hf_config_class
            else None
        )
        view = HFConfig(data, source, defaults=defaults, family=self.name)
        view.root = dict(raw)
        return view

    def variant_groups(self, hf_config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        """Each group of alternative HF layouts (`Param.variant`) and its options, default
        first, among the rows that apply to this config."""
        hf = self.hf(hf_config)
        groups: dict[str, tuple[str, ...]] = {}
        for param in self._rows_of_config(hf):
            if param.variant is not None:
                group, option = param.variant
                if option not in groups.get(group, ()):
                    groups[group] = (*groups.get(group, ()), option)
        if self.mtp_layers(hf):
            groups[MTP_LAYOUT] = (MTP_CONVERTED, MTP_ABSENT)
        return groups

    def resolve_variants(
        self, hf_config: Mapping[str, Any], variants: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """``variants`` with each unnamed group at its default; unknown names are refused."""
        groups = self.variant_groups(hf_config)
        chosen = dict(variants or {})
        for group, option in chosen.items():
            if group not in groups or option not in groups[group]:
                known = {g: list(o) for g, o in groups.items()}
                raise ValueError(
                    f"{self.name}: unknown HF layout {group}={option!r}; this config has {known}"
                )
        return {group: chosen.get(group, options[0]) for group, options in groups.items()}

    def active_params(
        self, hf_config: Mapping[str, Any], variants: Mapping[str, str] | None = None
    ) -> tuple[Param, ...]:
        """The rows of this config; of alternative layouts, the chosen ``variants`` (defaults
        elsewhere)."""
        hf = self.hf(hf_config)
        chosen = self.resolve_variants(hf, variants)
        without_mtp = chosen.get(MTP_LAYOUT) == MTP_ABSENT
        return tuple(
            p
            for p in self._rows_of_config(hf)
            if (p.variant is None or chosen[p.variant[0]] == p.variant[1])
            and not (without_mtp and p.in_mtp)
        )

    def _rows_of_config(self, hf: HFConfig) -> Iterator[Param]:
        """The rows that apply to the config (MTP rows only where it declares MTP layers)."""
        has_mtp = self.mtp_layers(hf) > 0
        return (p for p in self.params if p.when(hf) and (has_mtp or not p.in_mtp))

    def converted_mtp_layers(
        self, hf_config: Mapping[str, Any], variants: Mapping[str, str] | None = None
    ) -> int:
        """The MTP layers the model has: the config's, unless the checkpoint held none."""
        hf = self.hf(hf_config)
        if (variants or {}).get(MTP_LAYOUT) == MTP_ABSENT:
            return 0
        return self.mtp_layers(hf)

    def transformer_config_kwargs(
        self, hf_config: Mapping[str, Any], variants: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """The family's TransformerConfig arguments; validates the config on the way.
        ``variants``: the checkpoint's HF layouts (without its MTP layers: no MTP)."""
        hf = self.hf(hf_config)
        kwargs = self.config(hf)
        mtp_layers = self.converted_mtp_layers(hf, variants)
        if mtp_layers:
            kwargs["mtp_num_layers"] = mtp_layers
        return kwargs

    def indexed_layer_keys(self, hf_config: Mapping[str, Any]) -> bool:
        """Whether the checkpoint has per-layer keys (``decoder.layers.{i}.``), not stacked."""
        return indexed_layer_keys(self.transformer_config_kwargs(hf_config))

    def transformer_config(
        self,
        hf_config: Mapping[str, Any],
        *,
        params_dtype: torch.dtype = torch.float32,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        variants: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> TransformerConfig:
        from megatron.core import transformer

        kwargs = self.transformer_config_kwargs(hf_config, variants)
        if kwargs.get("experimental_attention_variant") == "gated_delta_net":
            from megatron_eaft.models.cpu_specs import gated_delta_net_runtime_settings

            kwargs.update(gated_delta_net_runtime_settings())
        kwargs.update(
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            pipeline_dtype=params_dtype,
        )
        kwargs.update(overrides)
        return getattr(transformer, self.megatron_config_class)(**kwargs)

    def layer_spec(self, config: TransformerConfig, transformer_impl: str = "local") -> ModuleSpec:
        check_transformer_impl(transformer_impl)
        return self.layer_spec_fn(config, transformer_impl)

    def decoder_spec(
        self,
        config: TransformerConfig,
        transformer_impl: str = "local",
        vp_stage: int | None = None,
    ) -> Any:
        """What ``GPTModel(transformer_layer_spec=...)`` takes: the block spec of this
        pipeline stage where the family has one, else the layer spec."""
        check_transformer_impl(transformer_impl)
        if self.block_spec_fn is not None:
            return self.block_spec_fn(config, transformer_impl, vp_stage)
        return self.layer_spec_fn(config, transformer_impl)

    def mtp_block_spec(
        self,
        config: TransformerConfig,
        transformer_impl: str = "local",
        vp_stage: int | None = None,
    ) -> Any:
        """What ``GPTModel(mtp_block_spec=...)`` takes: None without MTP layers or on a stage
        that builds none (Megatron puts them all on the last pipeline stage)."""
        check_transformer_impl(transformer_impl)
        if not getattr(config, "mtp_num_layers", None):
            return None
        if self.mtp_layer_spec_fn is None:
            raise UnsupportedConfigError(f"{self.name}: MTP layers are not supported")
        from megatron_eaft.models.cpu_specs import mtp_block_spec

        layer = self.mtp_layer_spec_fn(config, transformer_impl)
        return mtp_block_spec(config, layer, transformer_impl, vp_stage)


def swiglu_rmsnorm_decoder_config(
    hf: HFConfig, dims: Dims, *, full_attention_only: bool = True
) -> dict[str, Any]:
    """TransformerConfig arguments shared by pre-norm RMSNorm + SwiGLU decoders (Llama, Qwen).

    ``full_attention_only``: refuse configs with other kinds of attention layers (families
    that map ``layer_types`` themselves pass False).
    """
    hf.reject_unless("hidden_act", lambda v: v in (None, "silu"), "only SiLU-gated MLPs convert")
    hf.require_plain_rope()
    if full_attention_only:
        hf.require_full_attention()
    return {
        "num_layers": dims.layers,
        "hidden_size": dims.hidden,
        "ffn_hidden_size": dims.ffn,
        "num_attention_heads": dims.heads,
        "num_query_groups": dims.groups,
        "kv_channels": dims.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "qk_layernorm": False,
        # HF decoders have no dropout on the residual branch; Megatron defaults to 0.1.
        "hidden_dropout": 0.0,
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
    }
