"""Peer check against Megatron-Bridge: for every family Bridge also converts, our
``convert import`` checkpoint, loaded into the GPTModel Bridge builds for the same HF config,
gives transformers' fp32 logits, and holds exactly the tensors Bridge's own HF conversion puts
into that model.

Bridge's model is ``AutoBridge.from_hf_pretrained(hf_dir).to_megatron_provider()``'s
``provide_distributed_model`` at TP1, switched to CPU by
``cpu_runtime.use_bridge_cpu_model_settings`` (local spec, fp32, no fused kernels; decoders
whose Bridge spec needs Transformer Engine get the CPU spec of the same decoder). Our checkpoint
goes in through Megatron's ``dist_checkpointing.load`` with the model's ``sharded_state_dict``
(every key both ways); Bridge's conversion through ``AutoBridge.load_hf_weights``.

GLM-4.7-Flash: Bridge 0.6.2 builds the q / kv latent norms with ``layernorm_epsilon``
(``rms_norm_eps``, 1e-5 here); transformers always uses 1e-6, and no provider field sets the
latent norms' eps apart. So Bridge's model, holding Bridge's or our tensors, misses
transformers' logits by the eps alone: beyond 1e-4 on the tiny model (whose small latents
make the eps matter), and within 1e-4 once the same model is built with latent-norm eps 1e-6.
MTP layers are left out (converted elsewhere).
"""

from __future__ import annotations

import pytest
import torch

from megatron_eaft.convert import verify
from megatron_eaft.convert.engine import import_hf_checkpoint
from tests.adapters import bridge_support
from tests.convert import tiny_models
from tests.glm4_moe_lite import glm4_moe_lite_models as glm
from tests.qwen3_5 import qwen3_5_models as q35
from tests.qwen3_5_moe import qwen3_5_moe_models as q35_moe

ATOL = 1e-4
# What transformers' Glm4MoeLiteAttention gives its latent norms, whatever rms_norm_eps says.
TRANSFORMERS_LATENT_NORM_EPS = 1e-6


def _hf_configs() -> dict:
    return {
        "qwen2": tiny_models.hf_config("qwen2_untied"),
        "qwen3": tiny_models.hf_config("qwen3_untied"),
        "qwen3_moe": tiny_models.hf_config("qwen3_moe"),
        "qwen3_5": q35.text_config(),
        "qwen3_5_moe": q35_moe.text_config(),
        "glm4_moe_lite": glm.config(num_nextn_predict_layers=0),
    }


def _random_model(family: str, config, seed: int):
    if family == "glm4_moe_lite":  # its latent scaling and random expert bias
        return glm.random_model(config, seed=seed)
    return tiny_models.random_model(config, seed=seed)


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """Per family: the tiny HF directory, our conversion of it and transformers' logits."""
    root = tmp_path_factory.mktemp("bridge_peer")
    input_ids = verify.sample_inputs(tiny_models.VOCAB, batch=2, seq_len=12, seed=11)
    cases = {}
    for seed, (family, config) in enumerate(_hf_configs().items()):
        model = _random_model(family, config, seed)
        hf_dir, megatron_dir = root / family / "hf", root / family / "megatron"
        model.save_pretrained(hf_dir)
        import_hf_checkpoint(hf_dir, megatron_dir, progress=False, fsync=False)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float()
        cases[family] = {"hf": str(hf_dir), "megatron": str(megatron_dir), "logits": logits}
    return input_ids, cases


# ---- in the worker --------------------------------------------------------------------------


def _bridge_model(bridge, latent_norm_eps: float | None = None):
    """The GPTModel Bridge's provider builds (TP1, CPU settings); for an MLA decoder,
    ``latent_norm_eps`` replaces Bridge's ``layernorm_epsilon`` in the latent norms."""
    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.models import cpu_specs

    provider = bridge.to_megatron_provider(load_weights=False)
    cpu_runtime.use_bridge_cpu_model_settings(provider)
    if latent_norm_eps is not None:
        provider.transformer_layer_spec = lambda config, vp_stage=None: (
            cpu_specs.mla_decoder_block_spec(config, "local", vp_stage, latent_norm_eps)
        )
    provider.finalize()
    (model,) = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None
    )
    return model.eval()


def _logits(model, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    positions = torch.arange(input_ids.size(1)).expand_as(input_ids)
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=positions, attention_mask=None)
    return logits[..., :vocab].float()


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


def _peer_job(cases: dict, input_ids: torch.Tensor) -> dict:
    with bridge_support.own_environment():
        return _peers(cases, input_ids)


def _peers(cases: dict, input_ids: torch.Tensor) -> dict:
    bridge_support.import_bridge()
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.conversion.param_mapping import AutoMapping

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.models.build import load_checkpoint_into_model

    cpu_runtime.initialize_parallel(tp=1)
    # Bridge picks a weight's TP split by its module's class name; the CPU spec's GDN subclass
    # splits as Bridge's "GatedDeltaNet" does (column).
    AutoMapping.register_module_type("LocalGatedDeltaNet", "column")
    results: dict = {"bridge_architectures": AutoBridge.list_supported_models()}
    for family, case in cases.items():
        vocab = case["logits"].size(-1)
        bridge = AutoBridge.from_hf_pretrained(case["hf"])
        model = _bridge_model(bridge)
        load_checkpoint_into_model(model, case["megatron"])
        ours = _tensors(model)
        result = {
            "bridge_model_class": type(model).__name__,
            "ours": _logits(model, input_ids, vocab),
        }
        # Wipe the model first, so that a tensor Bridge leaves alone cannot pass as equal.
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor is not None and torch.is_floating_point(tensor):
                    tensor.fill_(float("nan"))
        bridge.load_hf_weights([model])
        theirs = _tensors(model)
        result["keys_only_ours"] = sorted(ours.keys() - theirs.keys())
        result["keys_only_bridge"] = sorted(theirs.keys() - ours.keys())
        result["differing_tensors"] = sorted(
            k for k in ours.keys() & theirs.keys() if not torch.equal(ours[k], theirs[k])
        )
        result["tensors"] = len(ours)
        if family == "glm4_moe_lite":
            fixed = _bridge_model(bridge, TRANSFORMERS_LATENT_NORM_EPS)
            load_checkpoint_into_model(fixed, case["megatron"])
            result["latent_eps_fixed"] = _logits(fixed, input_ids, vocab)
            result["layernorm_epsilon"] = model.config.layernorm_epsilon
        results[family] = result
    return results


# ---- the test -------------------------------------------------------------------------------


def _max_diff(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    comparison = verify.compare_logits(reference, candidate)
    assert comparison.top1_agreement == 1.0, comparison.line()
    return comparison.max_abs_diff


def test_our_checkpoints_in_bridges_models_give_transformers_logits(bridge_dist, peers):
    input_ids, cases = peers
    from megatron_eaft.models.families import all_families

    results = bridge_dist.run(_peer_job, 1, cases, input_ids, timeout=600)[0]
    # Every family of ours whose HF architecture Bridge registers is checked (dense GLM-4 is not
    # in Bridge 0.6.2).
    bridged = set(results.pop("bridge_architectures"))
    assert {
        name for name, family in all_families().items() if bridged & set(family.architectures)
    } == set(cases)
    assert results.keys() == cases.keys()
    for family, result in results.items():
        assert result["bridge_model_class"] == "GPTModel", family
        # Bridge's own conversion fills the same model with exactly our tensors.
        assert result["tensors"] > 0
        assert not result["keys_only_ours"] and not result["keys_only_bridge"], family
        assert not result["differing_tensors"], (family, result["differing_tensors"])
        reference = cases[family]["logits"]
        diff = _max_diff(reference, result["ours"])
        if family != "glm4_moe_lite":
            assert diff <= ATOL, (family, diff)
            continue
        # Bridge's latent norms at rms_norm_eps, not transformers' 1e-6: the only difference.
        assert result["layernorm_epsilon"] == glm.CONFIG["rms_norm_eps"] != 1e-6
        assert diff > ATOL, diff
        assert _max_diff(reference, result["latent_eps_fixed"]) <= ATOL
