"""EAFT through NeMo 2's real classes: the loss reduction, the callback, whole llm.finetune runs.

Run with `make test-nemo2` (envs/nemo2: nemo-toolkit 2.7.3 on Megatron-Core 0.15.3).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nemo.lightning.megatron_parallel import MaskedTokenLossReduction

from megatron_eaft.megatron.nemo2 import EAFTCallback, EAFTLossReduction, add_eaft_to_recipe
from megatron_eaft.ops import EAFTConfig, TokenLoss

RUN_SCRIPT = Path(__file__).with_name("finetune_run.py")
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "nemo2" / "qwen3_eaft_finetune.py"
EAFT_KEYS = ("lm loss", "eaft loss", "eaft/mean_weight", "eaft/mean_entropy")


def _per_token_loss(stats: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ce = torch.rand(2, 5, generator=generator) * 4
    weight = torch.rand(2, 5, generator=generator)
    loss_mask = (torch.rand(2, 5, generator=generator) > 0.3).float()
    loss = (ce * weight) if stats else ce.clone()
    if stats:
        entropy = weight.clone()
        loss.eaft_stats = TokenLoss(loss, ce, weight, entropy, torch.exp(-ce))
    return loss, {"loss_mask": loss_mask}


def test_sft_reduction_is_nemos_masked_token_loss() -> None:
    loss, batch = _per_token_loss(stats=False)
    ours = EAFTLossReduction(EAFTConfig(kind="sft", diagnostics=False)).forward(dict(batch), loss)
    nemos = MaskedTokenLossReduction().forward(dict(batch), loss)
    torch.testing.assert_close(ours[0], nemos[0], rtol=0, atol=0)
    assert int(ours[1]) == int(nemos[1])
    torch.testing.assert_close(
        ours[2]["loss_sum_and_ub_size"], nemos[2]["loss_sum_and_ub_size"].float(), rtol=0, atol=0
    )


def test_eaft_reduction_trains_on_weighted_loss_and_validates_on_cross_entropy() -> None:
    loss, batch = _per_token_loss(stats=True)
    mask = batch["loss_mask"].reshape(-1)
    config = EAFTConfig()
    train = EAFTLossReduction(config).forward(dict(batch), loss)
    validate = EAFTLossReduction(config, validation_step=True).forward(dict(batch), loss)
    torch.testing.assert_close(train[0], (loss.reshape(-1) * mask).sum())
    torch.testing.assert_close(validate[0], (loss.eaft_stats.ce.reshape(-1) * mask).sum())
    pair = train[2]["eaft_report/eaft/mean_weight"]
    torch.testing.assert_close(
        pair, torch.stack([(loss.eaft_stats.weight.reshape(-1) * mask).sum(), mask.sum()])
    )


def test_callback_rejects_bad_options_before_any_model_is_built() -> None:
    with pytest.raises(ValueError, match=r"unknown option.*topK"):
        EAFTCallback(topK=20)
    with pytest.raises(ValueError, match="kind"):
        EAFTCallback(kind="eaftt")
    module = type("NotAGPTModel", (), {})()
    with pytest.raises(ValueError, match=r"fused_output.*Megatron-Core >= 0\.19"):
        EAFTCallback(fused_output=True).setup(None, module, "fit")
    with pytest.raises(TypeError, match="not a NeMo 2 GPTModel"):
        EAFTCallback().setup(None, module, "fit")


def _example():
    spec = importlib.util.spec_from_file_location("qwen3_eaft_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_recipe_is_nemos_qwen3_recipe_with_one_eaft_callback(tmp_path: Path) -> None:
    import fiddle as fdl
    from nemo.collections import llm

    example = _example()
    args = example.parse_args(
        [
            "--recipe",
            "qwen3_600m",
            "--dataset-root",
            str(tmp_path),
            "--dir",
            str(tmp_path),
            "--gpus-per-node",
            "2",
            "--eaft-kind",
            "eaft",
            "--eaft-topk",
            "10",
        ]
    )
    recipe = example.build_recipe(args)
    assert fdl.get_callable(recipe) is llm.finetune
    assert fdl.get_callable(recipe.data) is llm.FineTuningDataModule
    assert recipe.data.dataset_root == str(tmp_path)
    assert recipe.trainer.devices == 2
    built = [c for c in recipe.trainer.callbacks if fdl.get_callable(c) is EAFTCallback]
    assert len(built) == 1
    assert fdl.build(built[0]).config == EAFTConfig(kind="eaft", topk=10)
    with pytest.raises(ValueError, match="already has an EAFTCallback"):
        add_eaft_to_recipe(recipe)
    with pytest.raises(ValueError, match="unknown option"):
        add_eaft_to_recipe(recipe, top_k=10)
    with pytest.raises(ValueError, match="--eaft-norm"):
        example.parse_args(
            ["--recipe", "qwen3_600m", "--dataset-root", "d", "--dir", "d", "--eaft-norm", "lnv"]
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finetune(work_dir: Path, name: str, *flags: str) -> list[dict[str, float]]:
    out = work_dir / f"{name}.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    run_dir = work_dir / name
    run_dir.mkdir()
    for sub in ("tokenizer", "data"):
        (run_dir / sub).symlink_to(work_dir / sub)
    result = subprocess.run(
        [sys.executable, str(RUN_SCRIPT), str(run_dir), str(out), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"{name} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(nemo2_work_dir: Path) -> dict[str, list[dict[str, float]]]:
    """NeMo's own finetune, then the same with EAFTCallback kind sft and kind eaft; at TP2 and
    PP2, NeMo's own and eaft (two gloo ranks that Lightning starts). Metrics are rank 0's: at
    PP2 the first stage, which computes no loss and logs the last stage's report."""
    return {
        "nemo": _finetune(nemo2_work_dir, "nemo", "--no-eaft"),
        "sft": _finetune(nemo2_work_dir, "sft", "--eaft-kind", "sft"),
        "eaft": _finetune(nemo2_work_dir, "eaft", "--eaft-kind", "eaft"),
        "nemo-tp2": _finetune(nemo2_work_dir, "nemo-tp2", "--no-eaft", "--tp", "2"),
        "eaft-tp2": _finetune(nemo2_work_dir, "eaft-tp2", "--eaft-kind", "eaft", "--tp", "2"),
        "nemo-pp2": _finetune(nemo2_work_dir, "nemo-pp2", "--no-eaft", "--pp", "2"),
        "eaft-pp2": _finetune(nemo2_work_dir, "eaft-pp2", "--eaft-kind", "eaft", "--pp", "2"),
    }


def test_sft_through_the_callback_is_nemos_own_run(runs) -> None:
    nemo, sft = runs["nemo"], runs["sft"]
    assert len(nemo) == len(sft) == 3
    for theirs, ours in zip(nemo, sft, strict=True):
        assert ours["reduced_train_loss"] == theirs["reduced_train_loss"]
        assert ours["grad_norm"] == theirs["grad_norm"]
        assert ours["lm loss"] == pytest.approx(ours["reduced_train_loss"], rel=1e-6)
        assert ours["eaft/mean_weight"] == 1.0


@pytest.mark.parametrize("layout", ["", "-tp2", "-pp2"], ids=["TP1", "TP2", "PP2"])
def test_eaft_keys_are_logged_and_the_weighted_loss_is_optimised(runs, layout: str) -> None:
    nemo, eaft = runs["nemo" + layout], runs["eaft" + layout]
    assert len(eaft) == 3
    for step in eaft:
        assert set(EAFT_KEYS) <= set(step)
        assert step["eaft loss"] == pytest.approx(step["reduced_train_loss"], rel=1e-6)
        assert 0.0 < step["eaft/mean_weight"] < 1.0
        assert step["eaft loss"] < step["lm loss"]
    # Same initial model and data: the first step's cross-entropy is NeMo's first loss.
    assert eaft[0]["lm loss"] == pytest.approx(nemo[0]["reduced_train_loss"], rel=1e-6)
    # From then on the weighted gradient has moved the model elsewhere.
    assert eaft[-1]["lm loss"] != pytest.approx(nemo[-1]["reduced_train_loss"], rel=1e-6)
