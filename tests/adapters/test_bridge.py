"""The Megatron-Bridge adapter against the real megatron.bridge package: Bridge's own
signature inspection and state injection, its gpt_step loss (kind sft must equal it), its
packed-sequence metadata, its pre-wrap hooks, and a TP=2 training step through Megatron's
schedule equal to EAFTForwardStep's."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_eaft.convert import verify
from megatron_eaft.convert.engine import import_hf_checkpoint
from megatron_eaft.ops import EAFTConfig
from tests.adapters import bridge_support
from tests.glm4 import glm4_models
from tests.megatron import tiny_gpt

EAFT = EAFTConfig(kind="eaft", topk=8)


def _setup(tp: int, config: EAFTConfig | None = None):
    """Bridge imported, parallel state at TP=tp, a tiny model and a Bridge GlobalState whose
    config is Bridge's SFT recipe base (offline-packed SQuAD, NaN check on)."""
    bridge_support.import_bridge()
    from megatron.bridge.recipes.common import _sft_common
    from megatron.bridge.training.state import GlobalState

    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.initialize_parallel(tp=tp)
    model = tiny_gpt.tiny_model(tiny_gpt.tiny_config())
    tiny_gpt.load_layout_independent_weights(model)
    state = GlobalState()
    state.cfg = _sft_common()
    return model, state


def _run(step, batch: dict[str, torch.Tensor], model, *call_args) -> tuple:
    with torch.no_grad():
        output, loss_func = step(iter([batch]), model, *call_args)
        return tuple(loss_func(output))


def _reference(config: EAFTConfig, batch: dict[str, torch.Tensor], model) -> tuple:
    from megatron_eaft.megatron.loss import EAFTForwardStep

    return _run(EAFTForwardStep(config), batch, model)


def _every_signature(config: EAFTConfig) -> dict:
    bridge_support.import_bridge()
    from megatron.bridge.training.utils.train_utils import (
        needs_global_state_injection,
        prepare_forward_step_func,
    )

    from megatron_eaft.megatron.bridge import EAFTBridgeForwardStep

    model, state = _setup(2)
    batch = tiny_gpt.batch(7)
    step = EAFTBridgeForwardStep(config)
    results = {}
    for name, callable_ in (("state", step), ("stateless", step.stateless())):
        prepared = prepare_forward_step_func(callable_, state)
        # How Megatron's schedules call a forward step: (data_iterator, model), and with
        # return_schedule_plan when the combined 1F1B schedule is on.
        results[name] = {
            "injected": needs_global_state_injection(callable_),
            "two_args": _run(prepared, batch, model),
            "with_plan_flag": _run(prepared, batch, model, False),
        }
    results["direct_state_call"] = _run(partial_state(step, state), batch, model)
    results["reference"] = _reference(config, batch, model)
    return results


def partial_state(step, state):
    return lambda data_iterator, model, *rest: step(state, data_iterator, model, *rest)


def _assert_same_loss(actual: tuple, expected: tuple) -> None:
    loss_sum, num_tokens, report = actual
    torch.testing.assert_close(loss_sum, expected[0], rtol=0, atol=0)
    assert int(num_tokens) == int(expected[1]) > 0
    assert report.keys() == expected[2].keys()
    for key, value in report.items():
        torch.testing.assert_close(value, expected[2][key], rtol=0, atol=0)


def test_every_bridge_signature_gives_eaft_forward_steps_loss_at_tp2(bridge_dist):
    for result in bridge_dist.run(_every_signature, 2, EAFT):
        assert result["state"]["injected"] is True
        assert result["stateless"]["injected"] is False
        reference = result["reference"]
        assert "eaft/confident_conflict_frac" in reference[2]
        for name in ("state", "stateless"):
            _assert_same_loss(result[name]["two_args"], reference)
            _assert_same_loss(result[name]["with_plan_flag"], reference)
        _assert_same_loss(result["direct_state_call"], reference)


def _model_inputs_of_the_bridge_step() -> dict:
    from megatron_eaft.megatron.bridge import EAFTBridgeForwardStep

    model, state = _setup(2)
    batch = tiny_gpt.batch(5)
    batch["loss_mask"][:, :10] = 0  # a prompt
    given = []
    forward = model.forward

    def recording(*args, **kwargs):
        given.append(kwargs)
        return forward(*args, **kwargs)

    model.forward = recording
    _run(partial_state(EAFTBridgeForwardStep(EAFT), state), batch, model)
    return {"given": given[0].get("loss_mask"), "batch": batch["loss_mask"]}


def test_the_bridge_step_gives_the_model_the_loss_mask(bridge_dist):
    """Megatron's MTP heads read it there (all ones without it), and fused_gradient: forward."""
    for result in bridge_dist.run(_model_inputs_of_the_bridge_step, 2):
        assert result["given"] is not None
        assert torch.equal(result["given"].cpu(), result["batch"])


def _against_bridge_gpt_step(config: EAFTConfig, training: bool) -> dict:
    bridge_support.import_bridge()
    from megatron.bridge.training import gpt_step

    from megatron_eaft.megatron.bridge import EAFTBridgeForwardStep

    model, state = _setup(2)
    model.train(training)
    batch = tiny_gpt.batch(11)
    # Bridge's step first: ours installs the EAFT loss on the model.
    bridge = _run(lambda it, m: gpt_step.forward_step(state, it, m), batch, model)
    ours = _run(partial_state(EAFTBridgeForwardStep(config), state), batch, model)
    return {"ours": ours, "bridge": bridge}


@pytest.mark.parametrize("diagnostics", [False, True])
def test_kind_sft_equals_bridges_own_gpt_step(bridge_dist, diagnostics):
    config = EAFTConfig(kind="sft", diagnostics=diagnostics)
    for result in bridge_dist.run(_against_bridge_gpt_step, 2, config, True):
        (loss_sum, num_tokens, report), bridge = result["ours"], result["bridge"]
        assert bridge[2].keys() == {"lm loss"}
        torch.testing.assert_close(loss_sum, bridge[0], rtol=0, atol=0)
        assert int(num_tokens) == int(bridge[1])
        torch.testing.assert_close(report["lm loss"], bridge[2]["lm loss"], rtol=0, atol=0)
        assert ("eaft/mean_entropy" in report) is diagnostics


def test_eval_optimises_plain_ce_and_keeps_bridges_lm_loss(bridge_dist):
    for result in bridge_dist.run(_against_bridge_gpt_step, 2, EAFT, False):
        (loss_sum, _, report), bridge = result["ours"], result["bridge"]
        torch.testing.assert_close(report["lm loss"], bridge[2]["lm loss"], rtol=1e-6, atol=0)
        torch.testing.assert_close(loss_sum, report["lm loss"][0])
        assert not torch.allclose(report["eaft loss"][0], report["lm loss"][0])


def _packed(layout: str, micro_batch: int) -> dict:
    from megatron_eaft.megatron.bridge import EAFTBridgeForwardStep

    model, state = _setup(1)
    data = tiny_gpt.batch(3)
    lengths = [12, 9, 11]
    cu_seqlens = torch.tensor([0, 12, 21, 32], dtype=torch.int32)
    rows = {
        "tokens": data["tokens"][:micro_batch],
        "labels": data["labels"][:micro_batch],
        "loss_mask": data["loss_mask"][:micro_batch],
        "position_ids": torch.cat([torch.arange(n) for n in lengths]).expand(micro_batch, -1),
    }
    if layout == "current":
        packed = {
            **rows,
            "cu_seqlens_q": cu_seqlens.unsqueeze(0),
            "cu_seqlens_kv": cu_seqlens.unsqueeze(0),
            "max_seqlen_q": torch.tensor([12], dtype=torch.int32),
            "max_seqlen_kv": torch.tensor([12], dtype=torch.int32),
        }
    else:  # Bridge's offline-packed files: -1 padded boundaries and the index of the first -1
        padded = torch.cat([cu_seqlens, torch.full((3,), -1, dtype=torch.int32)])
        packed = {
            **rows,
            "cu_seqlens": padded.unsqueeze(0),
            "cu_seqlens_argmin": torch.tensor([4]),
            "max_seqlen": torch.tensor([12], dtype=torch.int32),
        }
    step = partial_state(EAFTBridgeForwardStep(EAFT), state)
    try:
        ours = _run(step, packed, model)
    except ValueError as error:
        return {"error": str(error)}
    return {"ours": ours, "reference": _reference(EAFT, {**rows, "cu_seqlens": cu_seqlens}, model)}


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_packed_rows_equal_eaft_forward_step(bridge_dist, layout):
    result = bridge_dist.run(_packed, 1, layout, 1)[0]
    _assert_same_loss(result["ours"], result["reference"])


def test_packed_rows_need_micro_batch_one(bridge_dist):
    result = bridge_dist.run(_packed, 1, "current", 2)[0]
    assert "micro-batch size 1" in result["error"]


def _provider_with_hook(config: EAFTConfig) -> dict:
    bridge_support.import_bridge()
    from megatron.bridge.models import GPTModelProvider
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_eaft.megatron.bridge import EAFTBridgeForwardStep, enable_eaft
    from megatron_eaft.megatron.loss import installed_config

    _, state = _setup(2)
    cfg = state.cfg
    tiny = tiny_gpt.tiny_config()  # the same transformer as every other tiny-model test
    cfg.model = GPTModelProvider(
        **{
            field.name: getattr(tiny, field.name)
            for field in dataclasses.fields(tiny)
            if field.init
        },
        vocab_size=tiny_gpt.VOCAB,
        seq_length=tiny_gpt.SEQ,
        position_embedding_type="rope",
        rotary_base=1_000_000,
        share_embeddings_and_output_weights=False,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True),
    )
    step = enable_eaft(cfg, config)
    cfg.model.finalize()
    chunks = cfg.model.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None
    )
    return {
        "step": isinstance(step, EAFTBridgeForwardStep) and step.config == config,
        "installed": [installed_config(chunk) for chunk in chunks],
    }


def test_enable_eaft_installs_the_loss_through_bridges_pre_wrap_hooks(bridge_dist):
    for result in bridge_dist.run(_provider_with_hook, 2, EAFT):
        assert result["step"]
        assert result["installed"] == [EAFT]


def _train_step(use_bridge_step: bool) -> dict:
    bridge_support.import_bridge()
    from megatron.bridge.training.utils.train_utils import prepare_forward_step_func

    from megatron_eaft.megatron.bridge import EAFTBridgeForwardStep
    from megatron_eaft.megatron.loss import EAFTForwardStep

    _, state = _setup(2)
    step = (
        prepare_forward_step_func(EAFTBridgeForwardStep(EAFT), state)
        if use_bridge_step
        else EAFTForwardStep(EAFT)
    )
    return tiny_gpt.one_training_step(
        distributed_optimizer=False, forward_step=step, report_key="eaft loss"
    )


def test_tp2_training_step_through_megatrons_schedule_equals_eaft_forward_step(bridge_dist):
    bridge = bridge_dist.run(_train_step, 2, True)
    reference = bridge_dist.run(_train_step, 2, False)
    for ours, expected in zip(bridge, reference, strict=True):
        assert ours["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert ours["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-6)
        assert ours["update_successful"]


GLM4_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bridge" / "glm4_eaft_sft.py"


def _glm4_example_logits(megatron_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """The GLM-4 example's Bridge model provider, built by Bridge, loaded from our conversion."""
    bridge_support.import_bridge()
    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.models import load_checkpoint_into_model
    from megatron_eaft.models.glm4_layer import Glm4TransformerLayer

    cpu_runtime.initialize_parallel()
    spec = importlib.util.spec_from_file_location("glm4_eaft_sft", GLM4_EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    provider = example.glm4_model_provider(Path(megatron_dir), 1, 1, 64, dtype=torch.float32)
    provider.finalize()
    (model,) = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None
    )
    assert all(isinstance(layer, Glm4TransformerLayer) for layer in model.decoder.layers)
    load_checkpoint_into_model(model, megatron_dir)
    model.eval()
    positions = torch.arange(input_ids.size(1)).unsqueeze(0).expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids, positions, None)


def test_glm4_example_provider_loads_our_conversion_and_matches_transformers(bridge_dist, tmp_path):
    config = glm4_models.tiny_hf_config()
    hf_dir = tmp_path / "hf"
    glm4_models.random_hf_model(config, seed=5).save_pretrained(hf_dir)
    megatron_dir = tmp_path / "megatron"
    import_hf_checkpoint(hf_dir, megatron_dir, dtype="fp32", progress=False, fsync=False)
    input_ids = verify.sample_inputs(config.vocab_size, batch=2, seq_len=10, seed=3)
    expected = verify.hf_logits(hf_dir, input_ids)
    logits = bridge_dist.run(_glm4_example_logits, 1, str(megatron_dir), input_ids)[0]
    torch.testing.assert_close(logits[..., : expected.size(-1)], expected, rtol=1e-4, atol=1e-4)


QWEN3_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bridge" / "qwen3_eaft_sft.py"
# The README's command line for the Qwen3 example.
QWEN3_README_ARGS = [
    *("--size", "8b", "--pretrained-checkpoint", "/ckpt/qwen3-8b"),
    *("--save", "/ckpt/qwen3-8b-eaft", "--eaft-kind", "eaft", "--eaft-topk", "20"),
]


def _qwen3_example_recipes(sizes: list[str]) -> dict:
    """The Qwen3 example's argument line and Bridge recipe per size, in a Bridge worker."""
    bridge_support.import_bridge()
    from megatron_eaft.megatron.megatron_lm import eaft_config_from_args

    spec = importlib.util.spec_from_file_location("qwen3_eaft_sft", QWEN3_EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(QWEN3_README_ARGS)
    return {
        "eaft": eaft_config_from_args(args),
        "recipes": {size: example.qwen3_sft_recipe(size).__name__ for size in sizes},
    }


def test_the_qwen3_examples_readme_command_finds_bridges_recipes(bridge_dist):
    """The README's Qwen3 command parses, and every size its --size help names has a recipe in
    Bridge 0.6.2 (calling one fetches the model's HF config, which the finetune() test does
    from a local model instead)."""
    sizes = ["600m", "1p7b", "4b", "8b", "14b", "32b"]
    result = bridge_dist.run(_qwen3_example_recipes, 1, sizes)[0]
    assert result["eaft"] == EAFTConfig(kind="eaft", topk=20)
    assert set(result["recipes"]) == set(sizes)
    assert all(name.startswith("qwen3_") for name in result["recipes"].values())
