"""Megatron-Bridge's real ``finetune()`` on CPU gloo ranks (TP=2), both ways across our format.

Qwen3: ``convert import`` -> Bridge finetune from it (``checkpoint.pretrained_checkpoint``)
with Bridge's own forward step and with ``enable_eaft`` kind ``sft`` (equal losses, EAFT keys
logged) -> ``convert export`` / ``verify`` of the checkpoint Bridge saved = the logits of
Bridge's final model. Dense GLM-4 (which only our converter handles): ``convert import`` ->
``examples/bridge/glm4_eaft_sft.py``'s config with EAFT -> ``convert export``. And a checkpoint
``megatron-eaft finetune`` saved is a Bridge pretrained checkpoint: Bridge's model at learning
rate 0 is our trained model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_eaft.convert import verify
from megatron_eaft.convert.engine import export_megatron_checkpoint, import_hf_checkpoint
from megatron_eaft.diagnostics.run_logs import read_tensorboard
from megatron_eaft.models.bridge_config import (
    metadata_from_bridge_run_config,
    read_bridge_run_config,
    read_model_metadata,
)
from megatron_eaft.ops import EAFTConfig
from tests.adapters import bridge_support
from tests.convert import tiny_models
from tests.glm4 import glm4_models
from tests.glm4_moe_lite import glm4_moe_lite_models
from tests.mtp.test_mtp import main_and_mtp_logits
from tests.qwen3_5 import qwen3_5_models
from tests.qwen3_5_moe import qwen3_5_moe_models
from tests.train import helpers as train_helpers

TP = 2
SEQ = 32
ITERATIONS = 3
GLOBAL_BATCH = 2
EAFT_KEYS = ("eaft loss", "eaft/mean_weight", "eaft/mean_entropy", "eaft/confident_conflict_frac")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "bridge"
GLM4_EXAMPLE = EXAMPLES / "glm4_eaft_sft.py"
AUTOBRIDGE_EXAMPLE = EXAMPLES / "autobridge_eaft_sft.py"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A two-rank layout of the AutoBridge example's run (its ``--tp`` / ``--ep`` /
    ``--sequence-parallel``); the ranks left over are data-parallel."""

    tp: int
    ep: int = 1
    sequence_parallel: bool = False

    def args(self) -> list[str]:
        return [
            *("--tp", str(self.tp), "--ep", str(self.ep)),
            *(["--sequence-parallel"] if self.sequence_parallel else []),
        ]


# The families Bridge converts but has no SFT recipe for, through the AutoBridge example: dense
# Qwen3.5 at TP2 (its Gated-DeltaNet output norm's gradient summed over TP by our CPU norm), the
# MoE families at TP1 / EP1 with two data-parallel ranks, and as Bridge's MoE recipes lay them
# out (Qwen3-MoE's SFT recipes: TP with sequence parallelism, experts spread over EP, expert TP
# 1): TP2 with sequence parallelism (Megatron-Core trains MoE at TP > 1 only with it) and EP2.
# And Qwen3.5 with its MTP layer (on CPU through cpu_runtime's local MTP block for Bridge).
AUTOBRIDGE_RUNS = {
    "qwen3_5-TP2": ("qwen3_5", Layout(tp=2)),
    "qwen3_5_mtp-TP2": ("qwen3_5_mtp", Layout(tp=2)),
    "glm4_moe_lite_mtp-TP2-SP-EP2": (
        "glm4_moe_lite_mtp",
        Layout(tp=2, ep=2, sequence_parallel=True),
    ),
    "qwen3_5_moe-DP2": ("qwen3_5_moe", Layout(tp=1)),
    "glm4_moe_lite-DP2": ("glm4_moe_lite", Layout(tp=1)),
    "qwen3_5_moe-TP2-SP-EP2": ("qwen3_5_moe", Layout(tp=2, ep=2, sequence_parallel=True)),
    "glm4_moe_lite-TP2-SP-EP2": ("glm4_moe_lite", Layout(tp=2, ep=2, sequence_parallel=True)),
}
# The reference MTP forward of a checkpoint, per family (tests/mtp/reference.py).
MTP_REFERENCES = {
    "qwen3_5": qwen3_5_models.mtp_head_logits,
    "glm4_moe_lite": glm4_moe_lite_models.mtp_head_logits,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, SFT JSONL data, and tiny random Qwen3 / GLM-4 HF models converted by us."""
    from megatron_eaft.demo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bridge_finetune")
    texts = [f"question {i}: what is {i} plus {i + 1}? answer {2 * i + 1}" for i in range(40)]
    tokenizer_dir = root / "tokenizer"
    tokenizer = train_tokenizer(texts, 300, tokenizer_dir)
    data = root / "data"
    data.mkdir()
    for split in ("training", "validation", "test"):
        rows = [{"input": f"what is {i} plus {i + 1}?", "output": f"{2 * i + 1}"} for i in range(8)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vocab = len(tokenizer)
    qwen3 = tiny_models.Case(
        "Qwen3ForCausalLM", {"tie_word_embeddings": False, "head_dim": 24, "vocab_size": vocab}
    )
    qwen3_5_mtp = qwen3_5_models.text_config(vocab_size=vocab, mtp_num_hidden_layers=1)
    qwen3_5_mtp_head = qwen3_5_models.mtp_head(qwen3_5_mtp, seed=9)
    # Models with an MTP layer (which transformers does not build) save it besides.
    save_with_mtp = {
        "qwen3_5_mtp": lambda model, hf_dir: qwen3_5_models.save_with_mtp(
            model, qwen3_5_mtp_head, hf_dir
        ),
        "glm4_moe_lite_mtp": lambda model, hf_dir: glm4_moe_lite_models.save(
            model, hf_dir, seed=11
        ),
    }
    models = {
        "qwen3": tiny_models.random_model(tiny_models.hf_config(qwen3), seed=3),
        "glm4": glm4_models.random_hf_model(
            glm4_models.tiny_hf_config(vocab_size=vocab, num_hidden_layers=2), seed=4
        ),
        "qwen3_5": qwen3_5_models.random_model(
            qwen3_5_models.text_config(vocab_size=vocab), seed=5
        ),
        "qwen3_5_mtp": qwen3_5_models.random_model(qwen3_5_mtp, seed=8),
        "qwen3_5_moe": tiny_models.random_model(
            qwen3_5_moe_models.text_config(vocab_size=vocab), seed=6
        ),
        # rms_norm_eps 1e-6: Bridge builds the latent norms with it, transformers (and so the
        # export) always with 1e-6, so Bridge's model and the export compute the same.
        "glm4_moe_lite": glm4_moe_lite_models.random_model(
            glm4_moe_lite_models.config(
                vocab_size=vocab, num_nextn_predict_layers=0, rms_norm_eps=1e-6
            ),
            seed=7,
        ),
        "glm4_moe_lite_mtp": glm4_moe_lite_models.random_model(
            glm4_moe_lite_models.config(vocab_size=vocab, rms_norm_eps=1e-6), seed=10
        ),
    }
    paths: dict[str, Path] = {"data": data}
    for name, model in models.items():
        hf_dir = root / f"{name}_hf"
        save_with_mtp.get(name, type(model).save_pretrained)(model, hf_dir)
        tokenizer.save_pretrained(str(hf_dir))
        import_hf_checkpoint(hf_dir, root / f"{name}_megatron", dtype="fp32", progress=False)
        paths[f"{name}_hf"] = hf_dir
        paths[f"{name}_megatron"] = root / f"{name}_megatron"
    paths["root"] = root
    return paths


# ---- in the workers -----------------------------------------------------------------------


def _cpu_run_settings(cfg, save_dir: str, tp: int = TP) -> None:
    """A few tiny iterations on CPU: Bridge's recipe otherwise as it is."""
    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.use_bridge_cpu_settings(cfg)
    cfg.model.tensor_model_parallel_size = tp
    cfg.model.seq_length = SEQ
    cfg.dataset.seq_length = SEQ
    # Unpacked rows: offline packing is a data-preparation step of its own.
    cfg.dataset.enable_offline_packing = False
    cfg.dataset.offline_packing_specs = None
    cfg.dataset.dataset_kwargs = {}
    # DataLoader worker processes would import Bridge without the TE placeholder.
    cfg.dataset.num_workers = 0
    cfg.train.train_iters = ITERATIONS
    cfg.train.global_batch_size = GLOBAL_BATCH
    cfg.train.micro_batch_size = 1
    cfg.validation.eval_interval = None
    cfg.validation.eval_iters = 0
    cfg.logger.tensorboard_dir = None
    cfg.scheduler.lr_warmup_iters = 0
    cfg.optimizer.lr = 1e-3
    cfg.checkpoint.save = cfg.checkpoint.load = save_dir
    cfg.checkpoint.save_interval = ITERATIONS


def _finetune(cfg, forward_step, input_ids: torch.Tensor) -> dict:
    """Bridge's finetune(); the loss report of every step and the final model's logits."""
    from megatron.bridge.training.callbacks import Callback
    from megatron.bridge.training.finetune import finetune
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
    from megatron.core.utils import unwrap_model

    reports: list[dict[str, float]] = []
    final: dict[str, torch.Tensor] = {}

    class Record(Callback):
        def on_train_step_end(self, context):
            reports.append({key: float(value) for key, value in context.loss_dict.items()})

        def on_train_end(self, context):
            (model,) = context.model
            gpt_model = unwrap_model(model)  # from inside Megatron's DDP wrapper
            if gpt_model.mtp_process:
                final["logits"], final["mtp_logits"] = main_and_mtp_logits(gpt_model, input_ids)
                return
            model.eval()
            positions = torch.arange(input_ids.size(1)).expand_as(input_ids)
            with torch.no_grad():
                logits = model(input_ids=input_ids, position_ids=positions, attention_mask=None)
            final["logits"] = gather_from_tensor_model_parallel_region(logits).float()

    # A job may run finetune() more than once (the Qwen3 job: Bridge's step, then EAFT's), and
    # each starts from the process-wide state the first found: Megatron's environment variables
    # (NVTE_* for the attention backend, and Bridge recipes' env_vars), its MTP loss tracker
    # (logged for any provider with mtp_num_layers set, 0 included) and its MoE metrics tracker
    # (whose entries keep the process groups of the run that made them).
    MTPLossLoggingHelper.tracker.clear()
    destroy_moe_metrics_tracker()
    with bridge_support.own_environment():
        finetune(cfg, forward_step_func=forward_step, callbacks=[Record()])
    return {"reports": reports, **final}


def _tiny_qwen3_recipe(hf_dir: str, megatron_dir: str):
    """Bridge's Qwen3 SFT recipe for a local HF model: its model and tokenizer lines
    (``AutoBridge.from_hf_pretrained(...).to_megatron_provider``) on ``_sft_common()``."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.recipes.common import _sft_common

    cfg = _sft_common()
    cfg.model = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_provider(load_weights=False)
    cfg.tokenizer.tokenizer_model = hf_dir
    cfg.checkpoint.pretrained_checkpoint = megatron_dir
    return cfg


def _qwen3_job(paths: dict[str, str], input_ids: torch.Tensor) -> dict:
    bridge_support.import_bridge()
    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.apply_bridge_cpu_patches()
    from megatron.bridge.training import gpt_step

    from megatron_eaft.megatron.bridge import enable_eaft, use_local_sft_data

    results = {}
    for name, use_eaft in (("bridge", False), ("eaft_sft", True)):
        cfg = _tiny_qwen3_recipe(paths["qwen3_hf"], paths["qwen3_megatron"])
        use_local_sft_data(cfg, paths["data"])
        _cpu_run_settings(cfg, str(Path(paths["root"]) / f"qwen3_{name}"))
        step = (
            enable_eaft(cfg, EAFTConfig(kind="sft", diagnostics=True))
            if use_eaft
            else gpt_step.forward_step
        )
        results[name] = _finetune(cfg, step, input_ids)
    return results


def _bridge_from_our_finetune_job(paths: dict[str, str], input_ids: torch.Tensor) -> dict:
    """Bridge's Qwen3 recipe from the checkpoint our trainer saved, learning rate 0."""
    bridge_support.import_bridge()
    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.apply_bridge_cpu_patches()
    from megatron_eaft.megatron.bridge import enable_eaft, use_local_sft_data

    cfg = _tiny_qwen3_recipe(paths["qwen3_hf"], paths["our_finetune"])
    use_local_sft_data(cfg, paths["data"])
    _cpu_run_settings(cfg, str(Path(paths["root"]) / "qwen3_from_ours"))
    cfg.optimizer.lr = cfg.optimizer.min_lr = 0.0
    return _finetune(cfg, enable_eaft(cfg, EAFTConfig(kind="eaft", topk=8)), input_ids)


def _our_finetune(checkpoint: str, data: str, save: str) -> None:
    from megatron_eaft.train.trainer import Trainer

    config = train_helpers.finetune_config(
        Path(checkpoint), Path(data), "train.iterations=2", f"checkpoint.save={save}"
    )
    trainer = Trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()


def _example(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def _scaled_down_run(paths: dict[str, str], save: str, tp: int) -> list[str]:
    """The README example commands' run arguments, scaled down, with kind eaft."""
    return [
        *("--save", save, "--tp", str(tp), "--seq-length", str(SEQ)),
        *("--train-iters", str(ITERATIONS), "--dataset-root", paths["data"]),
        *("--eaft-kind", "eaft", "--eaft-topk", "8"),
    ]


def _glm4_job(paths: dict[str, str], input_ids: torch.Tensor) -> dict:
    bridge_support.import_bridge()
    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.apply_bridge_cpu_patches()
    from megatron_eaft.megatron.bridge import enable_eaft
    from megatron_eaft.megatron.megatron_lm import eaft_config_from_args

    example = _example(GLM4_EXAMPLE)
    save = str(Path(paths["root"]) / "glm4_eaft")
    # The README's command line, scaled down (the example's own argument parser).
    args = example.parse_args(
        ["--megatron-checkpoint", paths["glm4_megatron"], *_scaled_down_run(paths, save, TP)]
    )
    cfg = example.glm4_sft_config(args)
    _cpu_run_settings(cfg, save)
    return _finetune(cfg, enable_eaft(cfg, eaft_config_from_args(args)), input_ids)


def _autobridge_job(paths: dict[str, str], run: str, input_ids: torch.Tensor) -> dict:
    """One family and layout: the README's AutoBridge example command, scaled down, kind eaft."""
    bridge_support.import_bridge()
    from megatron_eaft.megatron import cpu_runtime

    cpu_runtime.apply_bridge_cpu_patches()
    from megatron_eaft.megatron.bridge import enable_eaft
    from megatron_eaft.megatron.megatron_lm import eaft_config_from_args

    example = _example(AUTOBRIDGE_EXAMPLE)
    model, layout = AUTOBRIDGE_RUNS[run]
    save = str(Path(paths["root"]) / f"{run}_eaft")
    args = example.parse_args(
        [
            *("--hf", paths[f"{model}_hf"]),
            *("--megatron-checkpoint", paths[f"{model}_megatron"]),
            *_scaled_down_run(paths, save, layout.tp),
            *layout.args(),
        ]
    )
    cfg = example.autobridge_sft_config(args)
    _cpu_run_settings(cfg, save, layout.tp)
    cfg.logger.tensorboard_dir = str(Path(save) / "tb")  # what Bridge logs (MTP losses)
    return _finetune(cfg, enable_eaft(cfg, eaft_config_from_args(args)), input_ids)


# ---- the tests -----------------------------------------------------------------------------


@pytest.fixture
def bridge_run(bridge_dist):
    """The package's Bridge workers, replaced first: each test's finetune() runs in new
    processes, as a launched run does. Reused workers keep process-wide state of the jobs before
    (Megatron's MoE metrics tracker held one job's EP groups), and in the slow suite two ranks
    of a later MoE run, sharing that state, ended up waiting in different collectives."""
    bridge_dist.restart()
    return bridge_dist


def _paths(tiny_run: dict[str, Path]) -> dict[str, str]:
    return {key: str(path) for key, path in tiny_run.items()}


def _export_equals_final_model(save_dir: Path, out: Path, input_ids, final_logits) -> None:
    export_megatron_checkpoint(save_dir, out, progress=False, fsync=False)
    expected = verify.hf_logits(out, input_ids)
    torch.testing.assert_close(final_logits[..., : expected.size(-1)], expected, rtol=0, atol=2e-5)


@pytest.mark.slow
def test_qwen3_from_our_conversion_through_bridge_finetune_and_back(bridge_run, tiny_run):
    vocab = read_model_metadata(tiny_run["qwen3_megatron"]).vocab_size
    input_ids = verify.sample_inputs(vocab, batch=2, seq_len=12, seed=7)
    results = bridge_run.run(_qwen3_job, TP, _paths(tiny_run), input_ids, timeout=600)[0]

    bridge, ours = results["bridge"]["reports"], results["eaft_sft"]["reports"]
    assert len(bridge) == len(ours) == ITERATIONS
    for bridge_step, our_step in zip(bridge, ours, strict=True):
        assert bridge_step.keys() == {"lm loss"}
        assert set(EAFT_KEYS) <= our_step.keys()
        assert our_step["lm loss"] == bridge_step["lm loss"]  # exactly: kind sft is plain CE
        assert our_step["eaft/mean_weight"] == 1.0
    assert ours[-1]["lm loss"] < ours[0]["lm loss"]

    save_dir = tiny_run["root"] / "qwen3_eaft_sft"
    run_config = read_bridge_run_config(save_dir / f"iter_{ITERATIONS:07d}")
    assert run_config["model"]["tensor_model_parallel_size"] == TP
    _export_equals_final_model(
        save_dir, tiny_run["root"] / "qwen3_export", input_ids, results["eaft_sft"]["logits"]
    )
    comparison = verify.verify_checkpoint(
        tiny_run["root"] / "qwen3_export", save_dir, tp=TP, runner=bridge_run.run
    )
    assert comparison.max_abs_diff < 1e-4 and comparison.top1_agreement == 1.0

    # Without our metadata (moved) and the HF directory (a hub id), the provider's own fields
    # describe the same model.
    run_config["checkpoint"]["pretrained_checkpoint"] = str(tiny_run["root"] / "moved")
    run_config["model"]["hf_model_id"] = "some-org/some-model"
    mapped = metadata_from_bridge_run_config(run_config, "run_config.yaml")
    original = read_model_metadata(tiny_run["qwen3_megatron"])
    assert mapped.family == original.family == "qwen3"
    assert _model_of(mapped) == _model_of(original)


def _model_of(metadata) -> dict:
    """What the family builds for the metadata's HF config (the trained length aside)."""
    family = metadata.model_family
    hf = family.hf(metadata.hf_config)
    built = {**family.transformer_config_kwargs(hf), **family.gpt_model_kwargs(hf)}
    built.pop("max_sequence_length", None)
    return {**built, "vocab": metadata.vocab_size}


@pytest.mark.slow
def test_glm4_our_conversion_bridge_finetune_our_export(bridge_run, tiny_run):
    vocab = read_model_metadata(tiny_run["glm4_megatron"]).vocab_size
    input_ids = verify.sample_inputs(vocab, batch=2, seq_len=12, seed=8)
    result = bridge_run.run(_glm4_job, TP, _paths(tiny_run), input_ids, timeout=600)[0]

    reports = result["reports"]
    assert len(reports) == ITERATIONS
    assert all(set(EAFT_KEYS) <= step.keys() for step in reports)
    assert any(step["eaft/mean_weight"] < 1.0 for step in reports)
    _export_equals_final_model(
        tiny_run["root"] / "glm4_eaft",
        tiny_run["root"] / "glm4_export",
        input_ids,
        result["logits"],
    )
    exported = json.loads((tiny_run["root"] / "glm4_export" / "config.json").read_text())
    assert exported["architectures"] == ["Glm4ForCausalLM"]


@pytest.mark.slow
def test_a_megatron_eaft_finetune_checkpoint_is_a_bridge_pretrained_checkpoint(
    dist, bridge_run, tiny_run, tmp_path
):
    vocab = read_model_metadata(tiny_run["qwen3_megatron"]).vocab_size
    data = train_helpers.write_sft_dataset(tmp_path / "data", packing="pad", vocab=vocab)
    ours = tmp_path / "ours"
    dist.run(_our_finetune, TP, str(tiny_run["qwen3_megatron"]), str(data), str(ours))

    input_ids = verify.sample_inputs(vocab, batch=2, seq_len=12, seed=9)
    paths = {**_paths(tiny_run), "our_finetune": str(ours)}
    result = bridge_run.run(_bridge_from_our_finetune_job, TP, paths, input_ids, timeout=600)[0]
    assert all(set(EAFT_KEYS) <= step.keys() for step in result["reports"])
    # Learning rate 0: Bridge's final model is the one our trainer saved, whose export is
    # what transformers computes.
    export_megatron_checkpoint(ours, tmp_path / "ours_hf", progress=False, fsync=False)
    expected = verify.hf_logits(tmp_path / "ours_hf", input_ids)
    torch.testing.assert_close(
        result["logits"][..., : expected.size(-1)], expected, rtol=0, atol=2e-5
    )
    original = verify.hf_logits(tiny_run["qwen3_hf"], input_ids)
    assert (original - expected).abs().max() > 1e-3, "our two steps changed the model"


@pytest.mark.slow
@pytest.mark.parametrize("run", AUTOBRIDGE_RUNS)
def test_qwen3_5_and_glm4_7_flash_our_conversion_bridge_finetune_our_export(
    bridge_run, tiny_run, run
):
    """Qwen3.5 (TP=2, with and without an MTP layer), Qwen3.5-MoE and GLM-4.7-Flash (TP=1
    with DP=2; TP=2 with sequence parallelism and EP=2): ``convert import`` ->
    ``examples/bridge/autobridge_eaft_sft.py``'s config with kind eaft -> ``convert export``."""
    model, layout = AUTOBRIDGE_RUNS[run]
    imported = read_model_metadata(tiny_run[f"{model}_megatron"])
    input_ids = verify.sample_inputs(imported.vocab_size, batch=2, seq_len=12, seed=10)
    result = bridge_run.run(_autobridge_job, 2, _paths(tiny_run), run, input_ids, timeout=900)[0]

    reports = result["reports"]
    assert len(reports) == ITERATIONS
    assert all(set(EAFT_KEYS) <= step.keys() for step in reports)
    assert all(torch.isfinite(torch.tensor(step["lm loss"])) for step in reports)
    assert any(step["eaft/mean_weight"] < 1.0 for step in reports)
    save_dir = tiny_run["root"] / f"{run}_eaft"
    saved = read_bridge_run_config(save_dir / f"iter_{ITERATIONS:07d}")["model"]
    assert saved["tensor_model_parallel_size"] == layout.tp
    assert saved["expert_model_parallel_size"] == layout.ep
    assert saved["sequence_parallel"] == layout.sequence_parallel
    assert read_model_metadata(save_dir).family == imported.family
    out = tiny_run["root"] / f"{run}_export"
    _export_equals_final_model(save_dir, out, input_ids, result["logits"])
    original = verify.hf_logits(tiny_run[f"{model}_hf"], input_ids)
    trained = verify.hf_logits(out, input_ids)
    assert (original - trained).abs().max() > 1e-3, "Bridge's steps changed nothing"
    logged = read_tensorboard(save_dir / "tb")
    if "mtp_logits" not in result:
        assert not any(tag.startswith("mtp_") for tag in logged)
        return
    # The MTP loss Bridge logs each step, and the trained MTP layer exported: the reference MTP
    # forward (transformers' modules) on the export gives Bridge's final MTP head's logits.
    assert [step for step, _ in logged["mtp_1 loss"]] == list(range(1, ITERATIONS + 1))
    assert all(math.isfinite(value) and value > 0 for _, value in logged["mtp_1 loss"])
    reference = MTP_REFERENCES[imported.family](out, input_ids)
    # The reference MTP forward's tolerance in tests/mtp (fp32, 1e-4): it runs one more layer
    # stack than the main logits above, and at 2e-5 one logit in 6204 (2.04e-5) failed once the
    # MTP head trained on loss-masked tokens only (a different trajectory, the same export).
    torch.testing.assert_close(
        result["mtp_logits"][:, :-1, : reference.size(-1)], reference[:, :-1], rtol=0, atol=1e-4
    )
