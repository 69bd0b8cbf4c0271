"""The forward-only pass over a checkpoint: equal to transformers + the oracle, at TP2 and DP2."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from megatron_eaft.cli.main import main
from megatron_eaft.diagnostics.model_pass import PassOptions, run_pass, select_rows
from megatron_eaft.diagnostics.statistics import EntropyAgreement, TokenHistogram
from megatron_eaft.ops import EAFTConfig, reference_token_loss

CONFIG = EAFTConfig(topk=8, conflict_entropy_threshold=0.5, conflict_prob_threshold=0.2)
OPTIONS = PassOptions(eaft=CONFIG, entropy_bins=20, prob_bins=20, agreement_bins=10)


def _transformers_statistics(hf_dir, data_dir, rows: int | None = None) -> dict:
    """The same statistics from transformers' logits and the single-device oracle.

    Packed rows are split into their samples (positions restart at 0 in each) and each
    sample is run on its own, which is what the block-diagonal mask must reproduce.
    """
    from transformers import AutoModelForCausalLM

    from megatron_eaft.data.sft_dataset import SFTDataset

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    dataset = SFTDataset(data_dir)
    histogram = TokenHistogram(CONFIG, 20, 20)
    agreement = EntropyAgreement(math.log(CONFIG.topk), 10)
    exact_config = EAFTConfig(kind="sft", entropy="exact", norm="lnv")
    for row in range(len(dataset) if rows is None else rows):
        item = dataset[row]
        bounds = item["cu_seqlens"].tolist()
        for start, end in itertools.pairwise(bounds):
            mask = item["loss_mask"][start:end]
            if not mask.any():
                continue
            tokens = item["tokens"][start:end].unsqueeze(0)
            with torch.no_grad():
                logits = model(input_ids=tokens).logits
            labels = item["labels"][start:end].unsqueeze(0)
            out = reference_token_loss(logits, labels, CONFIG, mask.unsqueeze(0))
            histogram.update(out.entropy, out.target_prob, out.ce, mask)
            exact = reference_token_loss(logits, labels, exact_config, mask.unsqueeze(0))
            top = torch.topk(logits.reshape(-1, logits.size(-1)), CONFIG.topk).values
            log_q = torch.log_softmax(top, dim=-1)
            topk_nats = -(log_q.exp() * log_q).sum(-1)
            agreement.update(topk_nats, exact.entropy.reshape(-1) * math.log(logits.size(-1)), mask)
    return {"statistics": histogram.to_dict(), "topk_vs_exact": agreement.to_dict()}


def _assert_close_statistics(got: dict, expected: dict) -> None:
    stats, reference = got["statistics"], expected["statistics"]
    assert stats["tokens"] == reference["tokens"] > 0
    for key in ("mean_entropy", "mean_target_prob", "mean_ce", "confident_conflict_frac"):
        assert stats[key] == pytest.approx(reference[key], abs=1e-4), key
    for kind, weight in reference["mean_weight"].items():
        assert stats["mean_weight"][kind] == pytest.approx(weight, abs=1e-4), kind
    # fp32 logits of the two implementations differ by ~1e-6: a token sitting on a bin edge
    # may move to the neighbouring bin, nothing more.
    counts = np.asarray(stats["histogram_2d"]["counts"])
    reference_counts = np.asarray(reference["histogram_2d"]["counts"])
    assert np.abs(counts - reference_counts).sum() <= 2
    agreement, reference_agreement = got["topk_vs_exact"], expected["topk_vs_exact"]
    assert agreement["tokens"] == reference_agreement["tokens"]
    # Near-uniform logits of a random model leave little variance: r is the touchy number.
    assert agreement["pearson_r"] == pytest.approx(reference_agreement["pearson_r"], abs=1e-3)
    assert agreement["mean_abs_error"] == pytest.approx(
        reference_agreement["mean_abs_error"], abs=1e-5
    )


def test_tp2_pass_equals_transformers_and_the_oracle(dist, tiny_model_dirs, packed_rows):
    result = run_pass(
        tiny_model_dirs["megatron"], packed_rows, tp=2, options=OPTIONS, runner=dist.run
    )
    assert result["layout"] == {"tp": 2, "pp": 1, "dp": 1}
    assert result["rows"] == result["dataset_rows"]
    expected = _transformers_statistics(tiny_model_dirs["hf"], packed_rows)
    _assert_close_statistics(result, expected)


def test_dp2_pass_reduces_over_data_parallel(dist, tiny_model_dirs, packed_rows):
    options = PassOptions(
        eaft=CONFIG, entropy_bins=20, prob_bins=20, agreement_bins=10, max_tokens=150
    )
    result = run_pass(
        tiny_model_dirs["megatron"], packed_rows, dp=2, options=options, runner=dist.run
    )
    assert result["layout"] == {"tp": 1, "pp": 1, "dp": 2}
    assert result["rows"] < result["dataset_rows"]
    assert result["statistics"]["tokens"] >= 150
    expected = _transformers_statistics(tiny_model_dirs["hf"], packed_rows, rows=result["rows"])
    _assert_close_statistics(result, expected)


def test_select_rows_stops_once_the_budget_is_covered():
    assert select_rows([5, 5, 5, 5], None) == [0, 1, 2, 3]
    assert select_rows([5, 5, 5, 5], 10) == [0, 1]
    assert select_rows([5, 5, 5, 5], 11) == [0, 1, 2]
    assert select_rows([0, 7], 1) == [0, 1]
    with pytest.raises(ValueError, match="max_tokens"):
        PassOptions(max_tokens=0)


def test_cli_writes_json_and_figures(dist, tiny_model_dirs, packed_rows, tmp_path, monkeypatch):
    import megatron_eaft.megatron.launcher as launcher

    # The CLI starts fresh worker processes; reuse the test pool's instead.
    monkeypatch.setattr(launcher, "run_distributed", dist.run)
    out = tmp_path / "diag"
    code = main(
        [
            "diagnose",
            "model",
            "--megatron",
            str(tiny_model_dirs["megatron"]),
            "--data",
            str(packed_rows),
            "--out",
            str(out),
            "--tp",
            "2",
            "--topk",
            "8",
            "--max-tokens",
            "100",
            "--bins",
            "10",
        ]
    )
    assert code == 0
    payload = json.loads((out / "diagnostics.json").read_text())
    assert payload["schema"] == "megatron_eaft.diagnostics/1"
    assert payload["layout"]["tp"] == 2
    assert payload["eaft_config"]["topk"] == 8
    assert len(payload["statistics"]["histogram_2d"]["counts"]) == 10
    assert payload["statistics"]["tokens"] >= 100
    assert -1.0 <= payload["topk_vs_exact"]["pearson_r"] <= 1.0
    for name in ("entropy_probability.png", "topk_vs_exact.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_cli_names_a_missing_checkpoint(tmp_path, capsys):
    code = main(
        [
            "diagnose",
            "model",
            "--megatron",
            str(tmp_path / "nope"),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1
    assert "--megatron" in capsys.readouterr().err
