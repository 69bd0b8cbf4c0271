"""Builders for trainer tests: tiny converted checkpoints, SFT datasets, configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megatron_eaft.train.config import FinetuneConfig, config_from_dict
from megatron_eaft.train.model import tiny_qwen3_hf_config

SEQ_LENGTH = 64
VOCAB = tiny_qwen3_hf_config()["vocab_size"]


TINY_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def converted_tiny_checkpoint(directory: Path, **overrides: Any) -> Path:
    """transformers' random tiny Qwen3 (or, with TINY_MOE, Qwen3-MoE) -> `convert import`."""
    import transformers

    from megatron_eaft.convert.engine import import_hf_checkpoint

    torch.manual_seed(0)
    values = tiny_qwen3_hf_config(**overrides)
    architecture = values["architectures"][0]
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    model = getattr(transformers, architecture)(config_class(**values))
    # transformers zero-initialises nothing we need; RMSNorm weights start at 1, give them spread
    # so that a wrong norm mapping cannot hide.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    hf_dir = directory / "hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    megatron_dir = directory / "megatron"
    import_hf_checkpoint(hf_dir, megatron_dir, dtype="fp32", progress=False, fsync=False)
    return megatron_dir


def random_samples(
    count: int, seed: int, min_length: int = 6, max_length: int = 40, vocab: int = VOCAB
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss mask) per sample: a prompt without loss, then a response with loss."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        length = int(rng.integers(min_length, max_length + 1))
        tokens = rng.integers(1, vocab, size=length).astype(np.uint16)
        prompt = int(rng.integers(1, length - 1))
        mask = np.zeros(length, dtype=np.uint8)
        mask[prompt:] = 1
        samples.append((tokens, mask))
    return samples


def write_sft_dataset(
    path: Path,
    *,
    packing: str,
    samples: list[tuple[np.ndarray, np.ndarray]] | None = None,
    seq_length: int = SEQ_LENGTH,
    seed: int = 0,
    vocab: int = VOCAB,
) -> Path:
    """A dataset in `prepare-data`'s layout, without a tokenizer."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_eaft.data.layout import LOSS_MASK_PREFIX, TOKENS_PREFIX, write_metadata
    from megatron_eaft.data.packing import pack

    samples = random_samples(48, seed, vocab=vocab) if samples is None else samples
    rows = pack([len(tokens) - 1 for tokens, _ in samples], seq_length, packing)
    path.mkdir(parents=True)
    builders = {
        TOKENS_PREFIX: IndexedDatasetBuilder(str(path / f"{TOKENS_PREFIX}.bin"), dtype=np.uint16),
        LOSS_MASK_PREFIX: IndexedDatasetBuilder(
            str(path / f"{LOSS_MASK_PREFIX}.bin"), dtype=np.uint8
        ),
    }
    for row in rows:
        for index in row:
            tokens, mask = samples[index]
            builders[TOKENS_PREFIX].add_item(torch.from_numpy(tokens))
            builders[LOSS_MASK_PREFIX].add_item(torch.from_numpy(mask))
        for builder in builders.values():
            builder.end_document()
    for prefix, builder in builders.items():
        builder.finalize(str(path / f"{prefix}.idx"))
    write_metadata(
        path,
        {"seq_length": seq_length, "pad_token_id": 0, "packing": packing, "vocab_size": vocab},
    )
    return path


def finetune_config(
    checkpoint: Path, data: Path, *overrides: str, **sections: Any
) -> FinetuneConfig:
    """A small fp32 CPU run: global batch 4 of micro-batches of 1, 3 steps, warm-up 1."""
    base = {
        "model": {"checkpoint": str(checkpoint), "dtype": "fp32", "transformer_impl": "local"},
        "data": {"path": str(data), "micro_batch_size": 1, "global_batch_size": 4},
        "train": {"iterations": 3},
        "optimizer": {"lr": 1e-3, "warmup_iterations": 1, "min_lr": 1e-4},
        "eaft": {"kind": "eaft", "check_finite": True},
        "logging": {"interval": 1},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config_from_dict(base, list(overrides))


def wandb_offline_history(wandb_dir: Path) -> dict[str, Any]:
    """The one offline W&B run under ``wandb_dir``: {"run": {project, display_name},
    "steps": {step: {key: value}}}, read back from its .wandb transaction log.

    The log is LevelDB's record format (32 KiB blocks of [crc32, length, type] chunks) after a
    7-byte ":W&B" header; each record is a wandb.proto Record.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, header = 32768, 7
    position, chunks = 7, []
    run: dict[str, str] = {}
    steps: dict[int, dict[str, Any]] = {}
    while position + header <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + header])
        if left < header or (kind == 0 and length == 0):  # block trailer / zero padding
            position += left
            continue
        chunks.append(data[position + header : position + header + length])
        position += header + length
        if kind not in (1, 4):  # FULL or LAST chunk: the record is complete
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(chunks))
        chunks = []
        if record.WhichOneof("record_type") == "run":
            run = {"project": record.run.project, "display_name": record.run.display_name}
        elif record.WhichOneof("record_type") == "history":
            row = {
                "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                for item in record.history.item
            }
            steps.setdefault(int(row["_step"]), {}).update(row)
    return {"run": run, "steps": steps}


def converted_family_checkpoint(directory: Path, family: str) -> Path:
    """A tiny random checkpoint of a newer family, from its test module's builders, without MTP
    layers, converted by `convert import` (fp32); four layers, so PP2 holds two on each stage.

    ``qwen3_5``: [linear, full, linear, full] attention; ``qwen3_5_moe``: the same with experts
    in every layer; ``glm4_moe_lite``: MLA, a dense first layer, then three MoE layers.
    """
    from megatron_eaft.convert.engine import import_hf_checkpoint

    hf_dir = directory / "hf"
    if family == "glm4_moe_lite":
        from tests.glm4_moe_lite import glm4_moe_lite_models as glm

        model = glm.random_model(
            glm.config(num_hidden_layers=4, num_nextn_predict_layers=0), seed=3
        )
        model.save_pretrained(hf_dir)
    else:
        from tests.qwen3_5 import qwen3_5_models as q35
        from tests.qwen3_5_moe import qwen3_5_moe_models as q35m

        models = {"qwen3_5": q35, "qwen3_5_moe": q35m}[family]
        models.save(models.random_model(models.text_config(), seed=3), hf_dir)
    megatron_dir = directory / "megatron"
    import_hf_checkpoint(hf_dir, megatron_dir, dtype="fp32", progress=False, fsync=False)
    return megatron_dir


def assert_same_reports(got: dict, expected: dict, label: object = None) -> None:
    """Two fp32 runs' reports: the same keys and token counts, totals to 1e-5."""
    assert set(got) == set(expected), label
    for key, (total, count) in expected.items():
        assert got[key][1] == count, (label, key)
        assert got[key][0] == pytest.approx(total, rel=1e-5, abs=1e-6), (label, key)


def assert_same_steps(got: list[dict], expected: list[dict]) -> None:
    """Step records ({"reports", "grad_norm"}) of two runs: the same, step by step."""
    assert len(got) == len(expected)
    for step, (ours, theirs) in enumerate(zip(got, expected, strict=True), start=1):
        assert_same_reports(ours["reports"], theirs["reports"], step)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4), step
