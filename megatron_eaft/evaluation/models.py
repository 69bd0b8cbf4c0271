"""The models to score: HF directories as they are, megatron-eaft checkpoints exported first.

A megatron-eaft checkpoint (``convert import`` output or a ``finetune`` checkpoint.save root)
is exported with :func:`megatron_eaft.convert.engine.export_megatron_checkpoint` (its latest
iteration) into a temporary directory beside the results, removed after scoring. A
fine-tuned checkpoint keeps no tokenizer: it comes from ``--tokenizer`` or the base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from megatron_eaft.convert.checkpoint import copy_side_files
from megatron_eaft.evaluation.harness import EvaluationError
from megatron_eaft.models.checkpoint_dir import HF_FILES_DIR, checkpoint_dir
from megatron_eaft.models.metadata import MODEL_METADATA_FILE

HF_CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    kind: Literal["hf", "megatron"]
    tokenizer: Path | None = None  # where an exported checkpoint's tokenizer comes from


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def parse_model(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after its directory)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    if not name or not path:
        raise EvaluationError(f"--model {text!r}: expected NAME=PATH or PATH")
    return name, Path(path)


def resolve_model(name: str, path: Path, tokenizer: Path | None) -> ModelSpec:
    """Which kind of directory ``path`` is; checked before anything is loaded."""
    if (path / HF_CONFIG_FILE).is_file():
        return ModelSpec(name, path, "hf")
    if not (path / MODEL_METADATA_FILE).is_file():
        raise EvaluationError(
            f"model {name}: {path} is neither an HF model directory ({HF_CONFIG_FILE}) nor a "
            f"megatron-eaft checkpoint ({MODEL_METADATA_FILE})"
        )
    try:
        checkpoint_dir(path)  # the tracker file names an iteration that exists
    except (OSError, ValueError) as error:
        raise EvaluationError(f"model {name}: {error}") from None
    side_files = path / HF_FILES_DIR
    if has_tokenizer(side_files):
        return ModelSpec(name, path, "megatron", side_files)
    if tokenizer is None or not has_tokenizer(tokenizer):
        raise EvaluationError(
            f"model {name}: {path} holds no tokenizer (fine-tuned checkpoints do not); give "
            "--tokenizer DIR (e.g. the base HF model)"
        )
    return ModelSpec(name, path, "megatron", tokenizer)


@contextlib.contextmanager
def hf_directory(model: ModelSpec, scratch: Path) -> Iterator[Path]:
    """An HF directory of the model for as long as the context lasts."""
    if model.kind == "hf":
        yield model.path
        return
    from megatron_eaft.convert.engine import export_megatron_checkpoint

    scratch.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".export-{model.name}-", dir=scratch))
    try:
        target = temporary / "hf"
        export_megatron_checkpoint(model.path, target, progress=False, fsync=False)
        if not has_tokenizer(target):
            assert model.tokenizer is not None  # resolve_model made sure
            copy_side_files(model.tokenizer, target)
        yield target
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
