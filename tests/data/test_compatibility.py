"""A dataset tokenised for another model is refused before anything is built."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_eaft.data.compatibility import (
    DatasetModelMismatch,
    check_dataset_for_model,
    tokenizer_fingerprint,
)
from megatron_eaft.data.layout import read_metadata
from megatron_eaft.data.prepare import PrepareConfig, prepare_dataset
from megatron_eaft.models import ModelMetadata
from megatron_eaft.models.checkpoint_dir import HF_FILES_DIR
from megatron_eaft.train.model import tiny_qwen3_hf_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("compat")
    source = root / "chats.jsonl"
    source.write_text(json.dumps({"prompt": "Hello?", "response": "Hi there."}) + "\n")
    prepare_dataset(
        PrepareConfig(
            inputs=[source],
            tokenizer=tokenizer_dir,
            output=root / "data",
            seq_length=32,
            progress=False,
        )
    )
    return root / "data"


def model(vocab_size: int) -> ModelMetadata:
    return ModelMetadata.for_hf_config(
        tiny_qwen3_hf_config(vocab_size=vocab_size), dtype="fp32", transformer_impl="local"
    )


def test_prepare_records_the_tokenizer_fingerprint(dataset, tokenizer):
    assert read_metadata(dataset)["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)


def test_a_vocabulary_larger_than_the_model_is_refused_naming_both(dataset, tokenizer):
    check_dataset_for_model(dataset, model(len(tokenizer)))  # exactly fits: accepted
    with pytest.raises(DatasetModelMismatch) as error:
        check_dataset_for_model(dataset, model(len(tokenizer) - 1), override_hint="use --x")
    message = str(error.value)
    assert str(dataset / "metadata.json") in message
    assert f"{len(tokenizer)}-token" in message and f"{len(tokenizer) - 1} token ids" in message
    assert "use --x" in message


def test_the_model_tokenizer_is_compared_when_the_checkpoint_has_one(
    dataset, tokenizer_dir, tmp_path
):
    root = tmp_path / "ckpt"
    shutil.copytree(tokenizer_dir, root / HF_FILES_DIR)
    check_dataset_for_model(dataset, model(512), root)  # the same tokenizer: accepted

    other = tmp_path / "other"
    shutil.copytree(tokenizer_dir, other / HF_FILES_DIR)
    tokenizer_file = other / HF_FILES_DIR / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text())
    vocab = spec["model"]["vocab"]
    first = next(token for token, index in vocab.items() if index == 100)
    vocab[first + "x"] = vocab.pop(first)  # one token renamed: another vocabulary
    tokenizer_file.write_text(json.dumps(spec))
    with pytest.raises(DatasetModelMismatch, match="vocabulary differs"):
        check_dataset_for_model(dataset, model(512), other)
