"""tools/bench_fused.py end to end at toy sizes: every variant at TP 1 and 2, the ratios it
documents, and the same loss from the fused and the unfused paths; and its memory trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOY_GRID = ("--tokens", "96", "--vocab", "512", "--hidden", "32", "--tp", "1", "2")


def _bench_fused(tmp_path: Path, *args: str) -> tuple[str, dict]:
    """(stdout, the JSON it wrote) of one run at the toy sizes."""
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "tools" / "bench_fused.py"), *TOY_GRID, *args]
    command += ["--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["schema"] == "megatron_eaft.bench_fused/1"
    assert [r["tp"] for r in payload["results"]] == [1, 2]
    return done.stdout, payload


def test_bench_fused_smoke(tmp_path):
    stdout, payload = _bench_fused(
        tmp_path, "--rounds", "1", "--chunk-tokens", "40", "--threads", "1"
    )
    assert "goal fused_eaft_topk time / unfused <= 1.15 (CPU)" in stdout
    for result in payload["results"]:
        assert result["clock"] == "cpu"
        assert set(result["time_ms_median"]) == set(payload["variants"])
        assert all(ms > 0 for ms in result["time_ms_median"].values())
        # The fused path gives the unfused per-token loss (bf16 logits either way).
        assert set(result["loss_max_abs_diff_fused_vs_unfused"]) == set(result["fused_vs_unfused"])
        assert all(d < 1e-3 for d in result["loss_max_abs_diff_fused_vs_unfused"].values())
        for fused, ratio in result["fused_vs_unfused"].items():
            assert ratio["vs"] == fused.replace("fused", "matmul").removesuffix("_forward")
            assert ratio["time_ratio_median"] > 0 and ratio["peak_ratio"] > 0


def test_bench_fused_trace_memory(tmp_path):
    """--trace-memory: peaks without running the kernels; the unfused paths hold the bf16
    logits and their fp32 copy (6 bytes per logit), the fused one a chunk of them."""
    _, payload = _bench_fused(tmp_path, "--trace-memory", "--chunk-tokens", "16")
    assert payload["memory_method"].startswith("traced")
    for result in payload["results"]:
        peaks, shard = result["peak_bytes"], result["logits_shard_bytes"]
        assert set(peaks) == set(payload["variants"])
        assert all(time is None for time in result["time_ms_median"].values())
        for fused, ratio in result["fused_vs_unfused"].items():
            assert peaks[ratio["vs"]] >= 3 * shard  # bf16 logits (the shard) + fp32 copy
            assert 0 < peaks[fused] < peaks[ratio["vs"]]
            assert ratio["peak_ratio"] == peaks[fused] / peaks[ratio["vs"]]
