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
from megatron_eaft.models.families import all_families
from megatron_eaft.models.metadata import MODEL_METADATA_FILE
from tests.convert import tiny_models
from tests.glm4 import glm4_models
from tests.glm4_moe_lite import glm4_moe_lite_models
from tests.qwen3_5 import qwen3_5_models
from tests.qwen3_5_moe import qwen3_5_moe_models

# What megatron.bridge.training.checkpointing._load_checkpoint_from_path (0.6.2) reads from it.
BRIDGE_READS = {
    "model": ("tensor_model_parallel_size", "pipeline_model_parallel_size"),
    "checkpoint": ("save_optim", "save_rng", "fully_parallel_save"),
}


def _hf_model(family: str):
    if family == "glm4":
        return glm4_models.random_hf_model(glm4_models.tiny_hf_config(num_hidden_layers=1))
    if family == "qwen3_5":
        return qwen3_5_models.random_model(qwen3_5_models.text_config())
    if family == "qwen3_5_moe":
        return tiny_models.random_model(qwen3_5_moe_models.text_config())
    if family == "glm4_moe_lite":
        config = glm4_moe_lite_models.config(num_nextn_predict_layers=0)
        return glm4_moe_lite_models.random_model(config)
    case = {"qwen2": "qwen2_tied", "qwen3": "qwen3_untied", "qwen3_moe": "qwen3_moe"}[family]
    return tiny_models.random_model(tiny_models.hf_config(case))


@pytest.mark.parametrize("transformer_impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("family", sorted(all_families()))  # a new family needs a case here
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


def _provider(**fields) -> dict:
    return {
        "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
        "transformer_impl": "local",
        **fields,
    }


def _hf_dir(tmp_path, hf_config) -> str:
    hf_config.save_pretrained(tmp_path / "hf")
    return str(tmp_path / "hf")


def test_a_qwen3_5_provider_with_our_cpu_block_spec_is_its_model(tmp_path):
    """Bridge's Qwen3.5 provider on CPU names our CPU build of its Gated-DeltaNet block; one
    naming Bridge's GPT layer spec builds plain attention layers and is refused."""
    hf_dir = _hf_dir(tmp_path, qwen3_5_models.text_config())
    cpu_spec = {"_target_": "megatron_eaft.megatron.cpu_runtime._gated_delta_net_cpu_spec"}
    model = _provider(
        hf_model_id=hf_dir,
        experimental_attention_variant="gated_delta_net",
        transformer_layer_spec=cpu_spec,
    )
    assert metadata_from_bridge_run_config({"model": model}, "run_config.yaml").family == "qwen3_5"
    gpt_layer = {**model, "transformer_layer_spec": {"_target_": "x.gpt_provider.local_layer_spec"}}
    with pytest.raises(MegatronCheckpointError, match="has its own decoder block"):
        metadata_from_bridge_run_config({"model": gpt_layer}, "run_config.yaml")
    plain = {**model, "experimental_attention_variant": "dsa"}
    with pytest.raises(MegatronCheckpointError, match="experimental_attention_variant"):
        metadata_from_bridge_run_config({"model": plain}, "run_config.yaml")


def test_fields_a_glm4_7_flash_model_does_not_read_may_differ(tmp_path):
    """Bridge's GLM-4.7-Flash provider sets kv_channels (unused under MLA) and
    moe_router_pre_softmax (unused with sigmoid scores) where our family does not; the score
    function itself must agree."""
    hf_dir = _hf_dir(tmp_path, glm4_moe_lite_models.config(num_nextn_predict_layers=0))
    model = _provider(
        hf_model_id=hf_dir,
        multi_latent_attention=True,
        kv_channels=8,
        moe_router_pre_softmax=True,
        moe_router_score_function="sigmoid",
        transformer_layer_spec={"_target_": "megatron_eaft.megatron.cpu_runtime._mla_cpu_spec"},
    )
    metadata = metadata_from_bridge_run_config({"model": model}, "run_config.yaml")
    assert metadata.family == "glm4_moe_lite"
    softmax = {**model, "moe_router_score_function": "softmax"}
    with pytest.raises(MegatronCheckpointError, match="moe_router_score_function"):
        metadata_from_bridge_run_config({"model": softmax}, "run_config.yaml")
    no_mla = {**model, "multi_latent_attention": False}
    with pytest.raises(MegatronCheckpointError, match="multi_latent_attention"):
        metadata_from_bridge_run_config({"model": no_mla}, "run_config.yaml")
