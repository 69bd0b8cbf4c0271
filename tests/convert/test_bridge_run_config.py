"""`convert import` writes what Megatron-Bridge reads from a pretrained checkpoint, for every
family and both spec names; a run config Bridge did not save is not taken for a model."""

from __future__ import annotations

import pytest
import yaml

from megatron_eaft.convert.engine import import_hf_checkpoint
from megatron_eaft.models import MegatronCheckpointError
from megatron_eaft.models.bridge_config import (
    BRIDGE_RUN_CONFIG_FILE,
    metadata_from_bridge_run_config,
    read_model_metadata,
)
from megatron_eaft.models.metadata import MODEL_METADATA_FILE
from tests.convert import tiny_models
from tests.glm4 import glm4_models

# What megatron.bridge.training.checkpointing._load_checkpoint_from_path (0.6.2) reads from it.
BRIDGE_READS = {
    "model": ("tensor_model_parallel_size", "pipeline_model_parallel_size"),
    "checkpoint": ("save_optim", "save_rng", "fully_parallel_save"),
}


def _hf_model(family: str):
    if family == "glm4":
        return glm4_models.random_hf_model(glm4_models.tiny_hf_config(num_hidden_layers=1))
    case = {"qwen2": "qwen2_tied", "qwen3": "qwen3_untied", "qwen3_moe": "qwen3_moe"}[family]
    return tiny_models.random_model(tiny_models.hf_config(case))


@pytest.mark.parametrize("transformer_impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe", "glm4"])
def test_import_writes_the_run_config_bridge_loads(tmp_path, family, transformer_impl):
    _hf_model(family).save_pretrained(tmp_path / "hf")
    out = tmp_path / "megatron"
    import_hf_checkpoint(
        tmp_path / "hf", out, transformer_impl=transformer_impl, progress=False, fsync=False
    )
    run_config = yaml.safe_load((out / "release" / BRIDGE_RUN_CONFIG_FILE).read_text())
    for section, keys in BRIDGE_READS.items():
        assert set(keys) <= run_config[section].keys()
    assert run_config["checkpoint"]["save_optim"] is False  # nothing for Bridge to restore
    assert run_config["checkpoint"]["save_rng"] is False
    # Our metadata, not the run config, describes the model; without it export refuses.
    assert read_model_metadata(out).family == family
    (out / MODEL_METADATA_FILE).unlink()
    with pytest.raises(MegatronCheckpointError, match=r"megatron_eaft_model\.json is missing"):
        read_model_metadata(out)


def test_a_provider_that_differs_from_its_hf_config_is_refused(tmp_path):
    hf_dir = tmp_path / "hf"
    tiny_models.random_model(tiny_models.hf_config("qwen3_untied")).save_pretrained(hf_dir)
    model = {
        "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
        "hf_model_id": str(hf_dir),
        "num_layers": 2,
        "hidden_size": 64,
        "qk_layernorm": False,  # Qwen3 has q/k norms: this is not the model config.json describes
        "transformer_impl": "local",
    }
    with pytest.raises(MegatronCheckpointError, match="qk_layernorm"):
        metadata_from_bridge_run_config({"model": model}, "run_config.yaml")
