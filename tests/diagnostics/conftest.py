"""A tiny converted Qwen3 checkpoint (with its HF source) and a packed SFT dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train import helpers


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"hf": transformers' random tiny Qwen3, "megatron": its `convert import` (fp32)}."""
    root = tmp_path_factory.mktemp("diagnostics_model")
    megatron_dir = helpers.converted_tiny_checkpoint(root)
    return {"hf": root / "hf", "megatron": megatron_dir}


@pytest.fixture(scope="session")
def packed_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of several samples (first-fit packing), seq_length 64, in prepare-data's layout."""
    return helpers.write_sft_dataset(
        tmp_path_factory.mktemp("diagnostics_data") / "packed", packing="first-fit", seed=3
    )
