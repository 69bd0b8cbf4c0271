"""Does a prepared dataset belong to a model? Checked from metadata before anything is built.

A dataset tokenised for another model trains without error as long as its ids fit the
model's embedding: silently wrong. ``prepare-data`` records the tokenizer's size and a
fingerprint of its vocabulary; the model's checkpoint carries its tokenizer files (``hf/``)
and its HF config. Both must agree unless the user says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from megatron_eaft.data.layout import read_metadata
from megatron_eaft.models.checkpoint_dir import HF_FILES_DIR
from megatron_eaft.models.metadata import MODEL_METADATA_FILE, ModelMetadata

# Files whose presence makes a directory loadable as a tokenizer by transformers.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class DatasetModelMismatch(ValueError):
    """The dataset was tokenised for another model; the message names both files."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the token -> id mapping (added tokens included): equal iff same vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def _model_tokenizer_dir(model_root: Path) -> Path | None:
    directory = model_root / HF_FILES_DIR
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return directory
    return None


def check_dataset_for_model(
    dataset_dir: str | os.PathLike,
    model: ModelMetadata,
    model_root: str | os.PathLike | None = None,
    *,
    override_hint: str = "",
) -> None:
    """Raise :class:`DatasetModelMismatch` when the dataset's tokenizer cannot be the model's.

    Refused: more token ids than the model's vocabulary (labels would index past the
    embedding, or worse, into its padding rows); a vocabulary fingerprint that differs from
    the tokenizer stored with the model (``<model_root>/hf/``), when both are known.
    ``override_hint`` says how to accept the mismatch (a flag or a config key).
    """
    metadata = read_metadata(dataset_dir)
    where = Path(dataset_dir) / "metadata.json"
    model_where = Path(model_root) / MODEL_METADATA_FILE if model_root is not None else "the model"
    hint = f" ({override_hint})" if override_hint else ""
    data_vocab = metadata.get("vocab_size")
    if isinstance(data_vocab, int) and data_vocab > model.vocab_size:
        raise DatasetModelMismatch(
            f"{where} was tokenised with a {data_vocab}-token vocabulary "
            f"({metadata.get('tokenizer', 'unknown tokenizer')}), but the model of "
            f"{model_where} has {model.vocab_size} token ids (hf_config.vocab_size): "
            f"prepare the data with the model's tokenizer{hint}"
        )
    data_fingerprint = metadata.get("tokenizer_fingerprint")
    tokenizer_dir = _model_tokenizer_dir(Path(model_root)) if model_root is not None else None
    if data_fingerprint is None or tokenizer_dir is None:
        return
    from megatron_eaft.data.chat_encoding import load_tokenizer

    if tokenizer_fingerprint(load_tokenizer(tokenizer_dir)) != data_fingerprint:
        raise DatasetModelMismatch(
            f"{where} was tokenised with {metadata.get('tokenizer', 'another tokenizer')}, "
            f"whose vocabulary differs from the model's tokenizer in {tokenizer_dir}: "
            f"prepare the data with the model's tokenizer{hint}"
        )
