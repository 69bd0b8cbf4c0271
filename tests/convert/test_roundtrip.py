"""HF -> Megatron -> HF is bit-exact, with the same config and the tokenizer files carried along."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_eaft.convert.engine import export_megatron_checkpoint, import_hf_checkpoint
from megatron_eaft.convert.hf_io import SAFETENSORS_INDEX
from megatron_eaft.convert.torch_dist import TorchDistReader
from megatron_eaft.models import checkpoint_dir as ckpt
from megatron_eaft.models.metadata import MODEL_METADATA_FILE, ModelMetadata
from tests.convert import tiny_models
from tests.convert.tiny_models import CASES, SIDE_FILES


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_returns_the_imported_tensors_bit_exact(converted, case, tmp_path):
    c = converted(case)
    summary = export_megatron_checkpoint(
        c.megatron_dir, tmp_path / "hf", progress=False, fsync=False
    )
    assert_same_tensors(hf_tensors(c.hf_dir), hf_tensors(tmp_path / "hf"))
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported == json.loads((c.hf_dir / "config.json").read_text())
    for name, text in SIDE_FILES.items():
        assert (tmp_path / "hf" / name).read_text() == text
    assert summary.tensors == len(hf_tensors(c.hf_dir))


def test_import_writes_megatron_layout_and_metadata(converted):
    c = converted("qwen2_tied")
    root = c.megatron_dir
    assert (root / ckpt.TRACKER_FILE).read_text() == "release"
    metadata = ModelMetadata.read(root)
    assert metadata.family == "qwen2"
    assert metadata.padded_vocab_size == 256
    assert metadata.dtype == "fp32"
    assert metadata.transformer_impl == "local"
    assert metadata.hf_config == json.loads((c.hf_dir / "config.json").read_text())
    stored = TorchDistReader(root / "release").tensor_keys()
    assert stored["embedding.word_embeddings.weight"] == ((256, 64), torch.float32)
    assert "output_layer.weight" not in stored  # tied
    embedding = TorchDistReader(root / "release").read("embedding.word_embeddings.weight")
    assert not embedding[tiny_models.VOCAB :].any(), "padding rows must be zero"
    assert sorted(p.name for p in (root / ckpt.HF_FILES_DIR).iterdir()) == sorted(
        [*SIDE_FILES, "generation_config.json"]
    )


def test_sharded_hf_input_and_sharded_export_load_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_models.random_model(tiny_models.hf_config("qwen3_untied"), seed=3)
    hf_dir = tiny_models.save_hf(model, tmp_path / "hf", max_shard_size="60KB")
    assert (hf_dir / SAFETENSORS_INDEX).is_file()
    import_hf_checkpoint(hf_dir, tmp_path / "mg", progress=False, fsync=False)
    export_megatron_checkpoint(
        tmp_path / "mg", tmp_path / "out", max_shard_bytes=50_000, progress=False, fsync=False
    )
    index = json.loads((tmp_path / "out" / SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in hf_tensors(hf_dir).values())
    assert_same_tensors(hf_tensors(hf_dir), hf_tensors(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tokens = torch.randint(0, tiny_models.VOCAB, (1, 8))
    assert torch.equal(tiny_models.logits(reloaded, tokens), tiny_models.logits(model, tokens))


def test_dtype_conversion_on_import_and_export(converted, tmp_path):
    c = converted("qwen3_tied")
    import_hf_checkpoint(c.hf_dir, tmp_path / "mg", dtype="bf16", progress=False, fsync=False)
    assert ModelMetadata.read(tmp_path / "mg").dtype == "bf16"
    stored = TorchDistReader(tmp_path / "mg" / "release").tensor_keys()
    assert {dtype for _, dtype in stored.values()} == {torch.bfloat16}
    export_megatron_checkpoint(tmp_path / "mg", tmp_path / "bf16", progress=False, fsync=False)
    expected = {k: v.to(torch.bfloat16) for k, v in hf_tensors(c.hf_dir).items()}
    assert_same_tensors(expected, hf_tensors(tmp_path / "bf16"))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    export_megatron_checkpoint(
        tmp_path / "mg", tmp_path / "fp32", dtype="fp32", progress=False, fsync=False
    )
    assert {t.dtype for t in hf_tensors(tmp_path / "fp32").values()} == {torch.float32}


def rank_load_and_resave(megatron_dir: str, out_dir: str, tp: int, ep: int) -> None:
    """What a trainer does: load the converted checkpoint at TP/EP, save it with Megatron."""
    from megatron.core import dist_checkpointing

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.models.build import build_gpt_model, load_checkpoint_into_model
    from megatron_eaft.models.families import get_family

    cpu_runtime.initialize_parallel(tp=tp, ep=ep)
    metadata = ModelMetadata.read(megatron_dir)
    family = get_family(metadata.family)
    config = family.transformer_config(
        metadata.hf_config, tp=tp, ep=ep, use_cpu_initialization=True
    )
    model = build_gpt_model(metadata.hf_config, config)
    load_checkpoint_into_model(model, megatron_dir)
    target = Path(out_dir) / ckpt.iteration_dir_name(7)
    if torch.distributed.get_rank() == 0:
        target.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(target))


@pytest.mark.parametrize(("case", "tp", "ep"), [("qwen2_untied", 2, 1), ("qwen3_moe", 2, 2)])
def test_export_of_a_checkpoint_saved_by_megatron_at_another_layout(
    dist, converted, tmp_path, case, tp, ep
):
    c = converted(case)
    saved = tmp_path / "trained"
    dist.run(rank_load_and_resave, tp * ep, str(c.megatron_dir), str(saved), tp, ep)
    # Megatron pads the vocab for TP2 (256 rows either way here) and splits every TP tensor.
    (saved / ckpt.TRACKER_FILE).write_text("7")
    shutil.copy(c.megatron_dir / MODEL_METADATA_FILE, saved / MODEL_METADATA_FILE)
    export_megatron_checkpoint(saved, tmp_path / "hf", progress=False, fsync=False)
    assert_same_tensors(hf_tensors(c.hf_dir), hf_tensors(tmp_path / "hf"))


def test_file_to_file_copies_are_bit_exact(converted, tmp_path, monkeypatch):
    import os

    from megatron_eaft.convert import torch_dist

    c = converted("qwen3_moe")
    # Tiny tensors normally take the plain write path; force every one through sendfile.
    monkeypatch.setattr(torch_dist, "_SENDFILE_MIN_BYTES", 1)
    sent = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd, in_fd, offset, count):
        if os.readlink(f"/proc/self/fd/{out_fd}").endswith(".distcp"):  # not shutil's copies
            sent.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    import_hf_checkpoint(c.hf_dir, tmp_path / "mg", progress=False, fsync=False)
    hf = hf_tensors(c.hf_dir)
    # Everything but q/k/v (interleaved, computed) goes file to file.
    copied = sum(
        t.nbytes
        for n, t in hf.items()
        if not n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
    )
    assert sum(sent) == copied
    export_megatron_checkpoint(tmp_path / "mg", tmp_path / "hf", progress=False, fsync=False)
    assert_same_tensors(hf, hf_tensors(tmp_path / "hf"))
