"""GLM-4 through the conversion engine: HF -> torch_dist -> logits, and back to HF bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_eaft.convert import verify
from megatron_eaft.convert.engine import (
    ConversionError,
    export_megatron_checkpoint,
    import_hf_checkpoint,
)
from megatron_eaft.models.families import family_for_hf_config
from megatron_eaft.models.families.glm4 import FAMILY as GLM4
from megatron_eaft.models.family import UnsupportedConfigError
from tests.glm4 import glm4_models as glm4

LOGIT_TOLERANCE = 1e-4
# Not a multiple of the vocab divisor or of TP: import pads, export cuts back.
PADDED_VOCAB_TEST_SIZE = 157


def _save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _import(hf_dir: Path, out_dir: Path) -> Path:
    import_hf_checkpoint(hf_dir, out_dir, dtype="fp32", progress=False, fsync=False)
    return out_dir


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4_untied")
    config = glm4.tiny_hf_config(vocab_size=PADDED_VOCAB_TEST_SIZE)
    hf_dir = _save_hf(glm4.random_hf_model(config, seed=11), root / "hf")
    return hf_dir, _import(hf_dir, root / "megatron")


def _assert_logits_match(dist, hf_dir: Path, megatron_dir: Path, tp: int, pp: int) -> None:
    input_ids = verify.sample_inputs(PADDED_VOCAB_TEST_SIZE, batch=2, seq_len=10, seed=3)
    expected = verify.hf_logits(hf_dir, input_ids)
    results = dist.run(verify.megatron_logits, tp * pp, str(megatron_dir), input_ids, tp, pp)
    diff = (results[0] - expected).abs().max().item()
    assert results[0].shape == expected.shape
    assert diff <= LOGIT_TOLERANCE, (tp, pp, diff)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2)])
def test_imported_checkpoint_logits_equal_transformers(dist, untied, tp, pp):
    hf_dir, megatron_dir = untied
    _assert_logits_match(dist, hf_dir, megatron_dir, tp, pp)


def _assert_export_bit_exact(hf_dir: Path, megatron_dir: Path, out_dir: Path) -> None:
    export_megatron_checkpoint(megatron_dir, out_dir, progress=False, fsync=False)
    original, exported = _hf_tensors(hf_dir), _hf_tensors(out_dir)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name

    from transformers import AutoConfig

    def comparable(directory: Path) -> dict:
        config = AutoConfig.from_pretrained(directory).to_dict()
        for where_and_who_wrote_it in ("_name_or_path", "transformers_version"):
            config.pop(where_and_who_wrote_it, None)
        return config

    assert comparable(out_dir) == comparable(hf_dir)


def test_export_returns_the_hf_tensors_bit_exact(untied, tmp_path):
    hf_dir, megatron_dir = untied
    _assert_export_bit_exact(hf_dir, megatron_dir, tmp_path / "exported")


def test_tied_embeddings_and_transformers4_style_config(dist, tmp_path):
    """config.json as GLM-4-0414 ships it (transformers 4): rope settings at the root.

    A non-default partial_rotary_factor (0.25) shows the value is read, not assumed.
    """
    config = glm4.tiny_hf_config(
        vocab_size=PADDED_VOCAB_TEST_SIZE,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 5000.0, "partial_rotary_factor": 0.25},
    )
    hf_dir = _save_hf(glm4.random_hf_model(config, seed=12), tmp_path / "hf")
    config_file = hf_dir / "config.json"
    legacy = json.loads(config_file.read_text())
    rope = legacy.pop("rope_parameters")
    legacy.update(rope_theta=rope["rope_theta"], partial_rotary_factor=0.25)
    config_file.write_text(json.dumps(legacy))
    assert GLM4.gpt_model_kwargs(GLM4.hf(legacy))["rotary_percent"] == 0.25

    megatron_dir = _import(hf_dir, tmp_path / "megatron")
    _assert_logits_match(dist, hf_dir, megatron_dir, tp=2, pp=1)
    _assert_export_bit_exact(hf_dir, megatron_dir, tmp_path / "exported")


def test_family_reads_transformers_defaults_where_config_is_silent():
    minimal = {
        "architectures": ["Glm4ForCausalLM"],
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 512,
        "vocab_size": 1000,
    }
    from transformers import Glm4Config

    hf_defaults = Glm4Config(**{k: v for k, v in minimal.items() if k != "architectures"})
    kwargs = family_for_hf_config(minimal).transformer_config_kwargs(minimal)
    assert kwargs["kv_channels"] == hf_defaults.head_dim == 128
    assert kwargs["layernorm_epsilon"] == hf_defaults.rms_norm_eps
    assert kwargs["add_qkv_bias"] is hf_defaults.attention_bias is True
    assert kwargs["rotary_interleaved"] is True
    model_kwargs = GLM4.gpt_model_kwargs(GLM4.hf(minimal))
    assert model_kwargs["rotary_percent"] == hf_defaults.rope_parameters["partial_rotary_factor"]
    assert model_kwargs["rotary_base"] == hf_defaults.rope_parameters["rope_theta"]
    assert model_kwargs["max_sequence_length"] == hf_defaults.max_position_embeddings

    without_bias = {**minimal, "attention_bias": False}
    keys = {p.key("local") for p in GLM4.active_params(without_bias)}
    assert "decoder.layers.self_attention.linear_qkv.bias" not in keys
    assert (
        family_for_hf_config(without_bias).transformer_config_kwargs(without_bias)["add_qkv_bias"]
        is False
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"partial_rotary_factor": 0}, "partial_rotary_factor"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_config_is_an_error_naming_the_key(change, named):
    config = {
        "architectures": ["Glm4ForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "vocab_size": 100,
        **change,
    }
    with pytest.raises(UnsupportedConfigError, match=named):
        family_for_hf_config(config)


def test_missing_sandwich_norm_is_reported_by_name(tmp_path):
    config = glm4.tiny_hf_config(vocab_size=PADDED_VOCAB_TEST_SIZE)
    hf_dir = _save_hf(glm4.random_hf_model(config, seed=13), tmp_path / "hf")
    (shard,) = hf_dir.glob("*.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.2.post_mlp_layernorm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})

    out_dir = tmp_path / "megatron"
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.post_mlp_layernorm\.weight"):
        _import(hf_dir, out_dir)
    assert not out_dir.exists()
