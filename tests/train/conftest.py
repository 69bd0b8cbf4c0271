"""Fixtures for trainer tests: a converted tiny Qwen3 checkpoint and small SFT datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train import helpers


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 made with transformers and converted by `convert import` (fp32)."""
    return helpers.converted_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="session")
def packed_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of several samples each (first-fit packing), seq_length 64."""
    return helpers.write_sft_dataset(
        tmp_path_factory.mktemp("data") / "packed", packing="first-fit"
    )


@pytest.fixture(scope="session")
def padded_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sample per row plus padding, seq_length 64."""
    return helpers.write_sft_dataset(tmp_path_factory.mktemp("data") / "padded", packing="pad")
