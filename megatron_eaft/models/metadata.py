"""What a checkpoint holds: the typed model description stored beside it.

``megatron_eaft_model.json`` is written by ``convert import`` and by the trainer into every
checkpoint root, so the model can be rebuilt from the directory alone at any TP/PP/EP
(:func:`megatron_eaft.models.build.build_model`) and exported back to HF.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_eaft.models.checkpoint_dir import MegatronCheckpointError
from megatron_eaft.models.families import family_for_hf_config, get_family
from megatron_eaft.models.family import (
    DEFAULT_VOCAB_DIVISOR,
    HFConfig,
    ModelFamily,
    UnsupportedConfigError,
)
from megatron_eaft.models.family import padded_vocab_size as megatron_padded_vocab
from megatron_eaft.outputs import write_text_atomically

MODEL_METADATA_FILE = "megatron_eaft_model.json"
METADATA_FORMAT_VERSION = 1
REQUIRED_KEYS = ("hf_config", "padded_vocab_size", "family", "dtype", "transformer_impl")
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def read_json_object(
    path: str | os.PathLike, error: type[Exception] = UnsupportedConfigError
) -> dict[str, Any]:
    """A JSON file holding one object (an HF ``config.json``, an index); errors name the file
    (and the line) and are raised as ``error``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """An HF config, the family that maps it, and how the Megatron tensors were stored."""

    family: str
    hf_config: Mapping[str, Any]
    padded_vocab_size: int
    dtype: str
    transformer_impl: str
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR
    source: str | None = None
    format_version: int = METADATA_FORMAT_VERSION
    # Which of the family's alternative HF tensor layouts the source used (`Param.variant`,
    # e.g. {"experts": "per_expert"}); export writes the same. Absent: the family's defaults.
    hf_variants: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # HF tensors the source held as exact copies of another (`ModelFamily.hf_copies`): not
    # stored, export writes them from the tensor they copy.
    hf_copies: tuple[str, ...] = ()

    @classmethod
    def for_hf_config(
        cls,
        hf_config: Mapping[str, Any],
        *,
        dtype: str,
        transformer_impl: str,
        source: str | None = None,
        padded_vocab_size: int | None = None,
        make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    ) -> ModelMetadata:
        """The description of a model given by its HF config (its family is looked up)."""
        family = family_for_hf_config(hf_config)
        if padded_vocab_size is None:
            vocab = family.dims(family.hf(hf_config)).vocab
            padded_vocab_size = megatron_padded_vocab(vocab, make_vocab_size_divisible_by)
        return cls(
            family=family.name,
            hf_config=dict(hf_config),
            padded_vocab_size=padded_vocab_size,
            dtype=dtype,
            transformer_impl=transformer_impl,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            source=source,
        )

    # -- the model it describes ---------------------------------------------------------

    @property
    def model_family(self) -> ModelFamily:
        return get_family(self.family)

    def hf(self, source: str = "hf_config") -> HFConfig:
        """The HF config, read through the view whose errors name ``source``."""
        return HFConfig(self.hf_config, source)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (HF ``vocab_size``); rows beyond it are padding."""
        family = self.model_family
        return family.dims(family.hf(self.hf())).vocab

    def padded_vocab_for_tp(self, tensor_parallel: int) -> int:
        """The stored padded vocab when TP divides it, else Megatron-LM's padding for this TP."""
        if self.padded_vocab_size % tensor_parallel == 0:
            return self.padded_vocab_size
        return megatron_padded_vocab(
            self.vocab_size, self.make_vocab_size_divisible_by, tensor_parallel
        )

    def replace(self, **changes: Any) -> ModelMetadata:
        return dataclasses.replace(self, **changes)

    # -- the file ------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "hf_config": dict(self.hf_config),
            "hf_variants": dict(self.hf_variants),
            "hf_copies": list(self.hf_copies),
        }

    def write(self, root: str | os.PathLike) -> Path:
        """Write ``megatron_eaft_model.json`` (atomically) into a checkpoint root."""
        path = Path(root) / MODEL_METADATA_FILE
        write_text_atomically(path, json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, root: str | os.PathLike) -> ModelMetadata:
        """The description stored in a converted (or trainer-saved) checkpoint root."""
        if not Path(root).is_dir():
            raise MegatronCheckpointError(f"{root} is not a directory")
        path = Path(root) / MODEL_METADATA_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if (Path(root) / "config.json").is_file():
                raise MegatronCheckpointError(
                    f"{root} is an HF model directory (it has config.json), not a Megatron "
                    f"checkpoint: convert it first with `megatron-eaft convert import --hf {root}`"
                ) from None
            raise MegatronCheckpointError(
                f"{path} is missing: {root} was not written by `megatron-eaft convert "
                "import` (or the trainer), so the model cannot be rebuilt from it"
            ) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MegatronCheckpointError(f"{path}:{exc.lineno}:{exc.colno}: {exc.msg}") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> ModelMetadata:
        if not isinstance(raw, dict):
            raise MegatronCheckpointError(f"{where}: expected a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise MegatronCheckpointError(f"{where}: missing keys {missing}")
        version = raw.get("format_version", METADATA_FORMAT_VERSION)
        if not isinstance(version, int) or version > METADATA_FORMAT_VERSION:
            raise MegatronCheckpointError(
                f"{where}: format_version {version!r} is newer than this code understands "
                f"({METADATA_FORMAT_VERSION})"
            )
        if not isinstance(raw["hf_config"], dict):
            raise MegatronCheckpointError(f"{where}: hf_config must be a JSON object")
        if raw["dtype"] not in DTYPE_NAMES:
            raise MegatronCheckpointError(
                f"{where}: dtype {raw['dtype']!r} is not one of {list(DTYPE_NAMES)}"
            )
        variants = raw.get("hf_variants", {})
        if not isinstance(variants, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in variants.items()
        ):
            raise MegatronCheckpointError(
                f"{where}: hf_variants must be a JSON object of strings, got {variants!r}"
            )
        copies = raw.get("hf_copies", [])
        if not isinstance(copies, list) or not all(isinstance(n, str) for n in copies):
            raise MegatronCheckpointError(
                f"{where}: hf_copies must be a JSON list of tensor names, got {copies!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in raw.items() if k in known}
        fields["hf_copies"] = tuple(copies)
        try:
            fields["padded_vocab_size"] = int(fields["padded_vocab_size"])
            fields["make_vocab_size_divisible_by"] = int(
                fields.get("make_vocab_size_divisible_by", DEFAULT_VOCAB_DIVISOR)
            )
        except (TypeError, ValueError):
            raise MegatronCheckpointError(
                f"{where}: padded_vocab_size / make_vocab_size_divisible_by must be integers"
            ) from None
        return cls(**fields)
