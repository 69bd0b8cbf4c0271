"""Every way a conversion refuses: bad inputs are reported by name, outputs stay atomic."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_eaft.convert import torch_dist
from megatron_eaft.convert.engine import (
    ConversionError,
    export_megatron_checkpoint,
    import_hf_checkpoint,
)
from megatron_eaft.convert.hf_io import HFCheckpointError
from megatron_eaft.convert.torch_dist import TorchDistReader, TorchDistWriter
from megatron_eaft.models import checkpoint_dir as ckpt
from megatron_eaft.models.checkpoint_dir import MegatronCheckpointError
from megatron_eaft.models.metadata import MODEL_METADATA_FILE, ModelMetadata
from megatron_eaft.outputs import (
    MARKER_FILE,
    DiskFullError,
    OutputKind,
    OutputRefusedError,
    atomic_output_dir,
)

FAST = {"progress": False, "fsync": False}


def copy_hf(converted, case: str, target: Path) -> Path:
    shutil.copytree(converted(case).hf_dir, target)
    return target


def rewrite_weights(hf_dir: Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_are_listed_together(converted, tmp_path):
    hf_dir = copy_hf(converted, "qwen2_untied", tmp_path / "hf")

    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)

    rewrite_weights(hf_dir, edit)
    with pytest.raises(ConversionError) as info:
        import_hf_checkpoint(hf_dir, tmp_path / "out", **FAST)
    message = str(info.value)
    assert "missing (1):\n    model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected (1):\n    model.layers.0.self_attn.rotary.weight" in message
    assert "model.layers.0.self_attn.k_proj.weight: expected [32, 64], found [16, 64]" in message
    assert not (tmp_path / "out").exists()


def test_lm_head_next_to_tied_embeddings_is_ignored(converted, tmp_path):
    hf_dir = copy_hf(converted, "qwen2_tied", tmp_path / "hf")
    rewrite_weights(
        hf_dir, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone())
    )
    import_hf_checkpoint(hf_dir, tmp_path / "out", **FAST)
    assert "output_layer.weight" not in TorchDistReader(tmp_path / "out" / "release").tensor_keys()


def test_unknown_architecture_is_named(converted, tmp_path):
    hf_dir = copy_hf(converted, "qwen2_tied", tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        import_hf_checkpoint(hf_dir, tmp_path / "out", **FAST)


def test_broken_config_json_names_file_and_line(converted, tmp_path):
    hf_dir = copy_hf(converted, "qwen2_tied", tmp_path / "hf")
    (hf_dir / "config.json").write_text('{\n  "architectures": ["Qwen2ForCausalLM"],\n  oops\n}')
    with pytest.raises(HFCheckpointError, match=r"config.json:3:3: invalid JSON"):
        import_hf_checkpoint(hf_dir, tmp_path / "out", **FAST)


def test_missing_weights_and_bad_index_are_named(converted, tmp_path):
    hf_dir = copy_hf(converted, "qwen2_tied", tmp_path / "hf")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(
        HFCheckpointError, match=re.escape("neither model.safetensors.index.json nor")
    ):
        import_hf_checkpoint(hf_dir, tmp_path / "out", **FAST)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        HFCheckpointError, match=re.escape("lists model-00001-of-00002.safetensors")
    ):
        import_hf_checkpoint(hf_dir, tmp_path / "out", **FAST)


def test_truncated_safetensors_is_named(converted, tmp_path):
    hf_dir = copy_hf(converted, "qwen2_tied", tmp_path / "hf")
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(HFCheckpointError, match="runs past the end of the file"):
        import_hf_checkpoint(hf_dir, tmp_path / "out", **FAST)


def test_mixed_dtypes_need_an_explicit_dtype(converted, tmp_path):
    hf_dir = copy_hf(converted, "qwen2_tied", tmp_path / "hf")
    rewrite_weights(
        hf_dir, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].half())
    )
    with pytest.raises(
        ConversionError, match=r"mixes dtypes torch.float16 \(1: model.norm.weight\)"
    ):
        import_hf_checkpoint(hf_dir, tmp_path / "out", **FAST)
    import_hf_checkpoint(hf_dir, tmp_path / "out", dtype="fp32", **FAST)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` and its bytes: what must survive a refused write."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_force_replaces_only_a_previous_import(converted, tmp_path):
    c = converted("qwen2_tied")
    out = tmp_path / "out"
    import_hf_checkpoint(c.hf_dir, out, **FAST)
    assert json.loads((out / MARKER_FILE).read_text())["kind"] == "megatron-checkpoint"
    with pytest.raises(FileExistsError, match="pass --force to replace it"):
        import_hf_checkpoint(c.hf_dir, out, **FAST)
    import_hf_checkpoint(c.hf_dir, out, force=True, **FAST)
    assert (out / ckpt.TRACKER_FILE).is_file()
    # Export is another kind: --force does not let it replace an imported checkpoint.
    with pytest.raises(OutputRefusedError, match="naming 'hf-checkpoint'"):
        export_megatron_checkpoint(c.megatron_dir, out, force=True, **FAST)
    # A file the import does not write makes it someone else's directory.
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(OutputRefusedError, match=rf"{out} exists .*it holds notes.txt"):
        import_hf_checkpoint(c.hf_dir, out, force=True, **FAST)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temp directories left"


def test_force_refuses_a_foreign_directory_a_file_and_a_link(converted, tmp_path):
    hf_dir = converted("qwen2_tied").hf_dir
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("old")
    with pytest.raises(OutputRefusedError, match=rf"{foreign} exists .*no {MARKER_FILE}"):
        import_hf_checkpoint(hf_dir, foreign, force=True, **FAST)
    assert (foreign / "keep.txt").read_text() == "old"
    regular = tmp_path / "model.bin"
    regular.write_text("weights")
    with pytest.raises(OutputRefusedError, match=rf"{regular} is a file, not a directory"):
        import_hf_checkpoint(hf_dir, regular, force=True, **FAST)
    assert regular.read_text() == "weights"
    link = tmp_path / "link"
    link.symlink_to(foreign)
    with pytest.raises(OutputRefusedError, match="is a symbolic link"):
        import_hf_checkpoint(hf_dir, link, force=True, **FAST)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory counts as absent: no --force needed
    import_hf_checkpoint(hf_dir, empty, **FAST)
    assert (empty / ckpt.TRACKER_FILE).is_file()


def test_import_never_writes_over_or_inside_its_hf_input(converted, tmp_path):
    hf_dir = copy_hf(converted, "qwen2_tied", tmp_path / "models" / "hf")
    before = tree(tmp_path)
    for out, relation in (
        (hf_dir, "is the input"),
        (tmp_path / "models", "contains the input"),
        (tmp_path, "contains the input"),
        (hf_dir / "megatron", "lies inside the input"),
    ):
        with pytest.raises(OutputRefusedError, match=rf"{out} {relation} {hf_dir}"):
            import_hf_checkpoint(hf_dir, out, force=True, **FAST)
    assert tree(tmp_path) == before


def test_export_never_writes_over_the_run_directory(converted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(converted("qwen2_tied").megatron_dir, run / "checkpoints")
    (run / "config.yaml").write_text("train: {iterations: 10}\n")
    (run / "metrics.jsonl").write_text("{}\n")
    before = tree(tmp_path)
    with pytest.raises(OutputRefusedError, match=rf"{run} contains the input"):
        export_megatron_checkpoint(run / "checkpoints", run, force=True, **FAST)
    assert tree(tmp_path) == before
    hf_out = run / "hf"
    export_megatron_checkpoint(run / "checkpoints", hf_out, **FAST)
    export_megatron_checkpoint(run / "checkpoints", hf_out, force=True, **FAST)
    assert json.loads((hf_out / MARKER_FILE).read_text())["kind"] == "hf-checkpoint"


def test_interrupted_import_leaves_nothing_that_looks_complete(converted, tmp_path, monkeypatch):
    c = converted("qwen3_untied")
    calls = {"n": 0}
    original = TorchDistWriter.write_chunk

    def failing_write_chunk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # what Ctrl-C does mid-write
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TorchDistWriter, "write_chunk", failing_write_chunk)
    with pytest.raises(KeyboardInterrupt):
        import_hf_checkpoint(c.hf_dir, tmp_path / "out", **FAST)
    assert list(tmp_path.iterdir()) == []


def fill_disk_after(monkeypatch, writes: int) -> None:
    """Make the torch_dist data file raise ENOSPC from its ``writes``-th write on, as a full
    disk does inside torch.save's zip writer."""
    calls = {"n": 0}
    original = torch_dist._DataFile.write

    def write(self, data):
        calls["n"] += 1
        if calls["n"] >= writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(torch_dist._DataFile, "write", write)


def test_full_disk_during_import_is_one_error_naming_the_output(converted, tmp_path, monkeypatch):
    fill_disk_after(monkeypatch, writes=3)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError) as info:
        import_hf_checkpoint(converted("qwen2_tied").hf_dir, out, **FAST)
    assert info.value.errno == errno.ENOSPC
    assert re.fullmatch(
        rf"no space left on device writing {out}: the filesystem at \S+ has [\d.]+ [kMG]?B free "
        r"of [\d.]+ [kMG]?B; free some space or write elsewhere",
        str(info.value),
    )
    assert list(tmp_path.iterdir()) == [], "the partial output is removed"


def test_non_float_weights_are_named_and_never_cast(converted, tmp_path):
    hf_dir = copy_hf(converted, "qwen2_tied", tmp_path / "hf")

    def edit(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
        tensors["model.layers.0.input_layernorm.weight"] = torch.ones_like(
            tensors["model.layers.0.input_layernorm.weight"], dtype=torch.bool
        )

    rewrite_weights(hf_dir, edit)
    for dtype in (None, "fp32"):
        with pytest.raises(ConversionError) as info:
            import_hf_checkpoint(hf_dir, tmp_path / "out", dtype=dtype, **FAST)
        message = str(info.value)
        assert "non-floating-point weights, which are never converted or cast" in message
        assert "model.norm.weight: torch.int32" in message
        assert "model.layers.0.input_layernorm.weight: torch.bool" in message
    assert not (tmp_path / "out").exists()


def test_import_removes_what_a_killed_import_of_the_same_out_left(converted, tmp_path, caplog):
    from tests.test_outputs import dead_pid, temporary_of

    out = tmp_path / "out"
    stale = temporary_of(out, dead_pid())
    with caplog.at_level(logging.WARNING, logger="megatron_eaft.outputs"):
        import_hf_checkpoint(converted("qwen2_tied").hf_dir, out, **FAST)
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert f"removed {stale} (1.00 kB) left by a killed write of {out}" in caplog.text


def test_temp_directory_of_a_killed_run_is_hidden_and_marked(tmp_path):
    kind = OutputKind("test", "a test output", ())
    with atomic_output_dir(tmp_path / "out", kind=kind) as tmp:
        assert tmp.name.startswith(".out.") and tmp.name.endswith(".incomplete")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out").is_dir()


# -- export ------------------------------------------------------------------------------------


def test_export_needs_the_model_metadata(converted, tmp_path):
    c = converted("qwen2_tied")
    root = tmp_path / "mg"
    shutil.copytree(c.megatron_dir, root)
    (root / MODEL_METADATA_FILE).unlink()
    with pytest.raises(
        MegatronCheckpointError, match=re.escape("megatron_eaft_model.json is missing")
    ):
        export_megatron_checkpoint(root, tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()


def test_export_needs_the_tracker_file(converted, tmp_path):
    root = tmp_path / "mg"
    shutil.copytree(converted("qwen2_tied").megatron_dir, root)
    (root / ckpt.TRACKER_FILE).unlink()
    with pytest.raises(
        MegatronCheckpointError, match=re.escape("latest_checkpointed_iteration.txt is missing")
    ):
        export_megatron_checkpoint(root, tmp_path / "out", **FAST)
    (root / ckpt.TRACKER_FILE).write_text("latest")
    with pytest.raises(MegatronCheckpointError, match="expected 'release' or an iteration number"):
        export_megatron_checkpoint(root, tmp_path / "out", **FAST)


def test_export_lists_missing_unexpected_and_misshaped_checkpoint_tensors(converted, tmp_path):
    c = converted("qwen3_untied")
    root = tmp_path / "mg"
    root.mkdir()
    shutil.copy(c.megatron_dir / MODEL_METADATA_FILE, root)
    (root / ckpt.TRACKER_FILE).write_text("release")
    source = TorchDistReader(c.megatron_dir / "release")
    writer = TorchDistWriter(root / "release", fsync=False)
    for key, (shape, _) in source.tensor_keys().items():
        if key == "decoder.final_layernorm.weight":
            continue
        tensor = source.read(key)
        if key == "decoder.layers.self_attention.q_layernorm.weight":
            tensor = torch.zeros(shape[0], 8)
        writer.write_chunk(key, tensor, [0] * tensor.dim(), tensor.shape)
    writer.write_chunk("decoder.layers.mystery.weight", torch.zeros(2, 3), (0, 0), (2, 3))
    # Tolerated: optimizer state, a ChainedOptimizer's too (expert-parallel MoE runs save one).
    for key in ("optimizer.state.exp_avg.x", "chained_1.optimizer.distributed.bucket_idx_0.param"):
        writer.write_chunk(key, torch.zeros(1), (0,), (1,))
    writer.finish()
    with pytest.raises(ConversionError) as info:
        export_megatron_checkpoint(root, tmp_path / "out", **FAST)
    message = str(info.value)
    assert "missing (1):\n    decoder.final_layernorm.weight" in message
    assert "unexpected (1):\n    decoder.layers.mystery.weight" in message
    assert (
        "decoder.layers.self_attention.q_layernorm.weight: expected [2, 24], found [2, 8]"
        in message
    )


def test_unknown_family_in_metadata_is_named(converted, tmp_path):
    root = tmp_path / "mg"
    shutil.copytree(converted("qwen2_tied").megatron_dir, root)
    metadata = json.loads((root / MODEL_METADATA_FILE).read_text())
    (root / MODEL_METADATA_FILE).write_text(json.dumps({**metadata, "family": "llama"}))
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        export_megatron_checkpoint(root, tmp_path / "out", **FAST)


def rank_load_untied_into_tied(megatron_dir: str) -> str:
    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.models.build import build_gpt_model, load_checkpoint_into_model
    from megatron_eaft.models.families import get_family

    cpu_runtime.initialize_parallel()
    hf_config = {**ModelMetadata.read(megatron_dir).hf_config, "tie_word_embeddings": True}
    config = get_family("qwen2").transformer_config(hf_config, use_cpu_initialization=True)
    model = build_gpt_model(hf_config, config)
    try:
        load_checkpoint_into_model(model, megatron_dir)
    except MegatronCheckpointError as error:
        return str(error)
    return "loaded"


def test_loading_into_a_model_that_does_not_match_is_an_error(dist, converted):
    message = dist.run(rank_load_untied_into_tied, 1, str(converted("qwen2_untied").megatron_dir))[
        0
    ]
    assert "not used by the model ['output_layer.weight']" in message
