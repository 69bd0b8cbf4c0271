"""examples/megatron_lm/pretrain_gpt_eaft.py under Megatron-LM's real ``pretrain()``.

Two gloo ranks on CPU at TP=2 train a tiny GPT on Megatron's mock data with EAFT switched
on; the test reads what a user reads: the console lines Megatron prints per iteration and
after validation, and the exit codes. Each rank runs the example as ``__main__`` through
:func:`probe_main` (this module run with ``-m``), which also scores iteration 1's
micro-batches with :class:`EAFTForwardStep`, so the logged ``lm loss`` can be checked exactly.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "megatron_lm" / "pretrain_gpt_eaft.py"
WORLD_SIZE = 2
TRAIN_ITERS = 4
VOCAB = 256  # the NullTokenizer's, already a multiple of 128 x TP: no padding rows
TIMEOUT_S = 120
EAFT_KEYS = (
    "lm loss",
    "eaft loss",
    "eaft/mean_weight",
    "eaft/mean_entropy",
    "eaft/confident_conflict_frac",
)

# A tiny Qwen3-style GPT at TP=2; the CPU switches are Megatron-LM's own flags (local layer
# spec instead of Transformer Engine, no fused kernels, in-process data loading).
COMMAND_LINE = f"""
    --tensor-model-parallel-size 2 --distributed-backend gloo
    --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4
    --group-query-attention --num-query-groups 2 --kv-channels 16
    --normalization RMSNorm --swiglu --disable-bias-linear --qk-layernorm
    --position-embedding-type rope --rotary-base 1000000 --untie-embeddings-and-output-weights
    --seq-length 64 --max-position-embeddings 64 --attention-dropout 0 --hidden-dropout 0
    --tokenizer-type NullTokenizer --vocab-size {VOCAB} --mock-data --num-workers 0
    --micro-batch-size 2 --global-batch-size 4
    --train-iters {TRAIN_ITERS} --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine
    --lr-warmup-iters 1 --clip-grad 1.0 --seed 1234
    --log-interval 1 --eval-interval {TRAIN_ITERS} --eval-iters 1
    --transformer-impl local --no-rope-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion
    --no-masked-softmax-fusion --no-gradient-accumulation-fusion --no-persist-layer-norm
    --no-create-attention-mask-in-dataloader
    --eaft-kind eaft --eaft-topk 8 --eaft-diagnostics
"""
ARGV = COMMAND_LINE.split()

REFERENCE_PREFIX = "EAFTForwardStep lm loss"
ITERATION_LINE = re.compile(r" iteration\s+(\d+)/\s*(\d+) \|")
KEY_VALUE = re.compile(r" ([^|:]+):\s+([-+0-9.eEinfa]+) \|")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_example(out: Path, argv: list[str]) -> tuple[list[int], list[str]]:
    """The example as WORLD_SIZE env:// ranks (what torchrun sets), each in its own session
    so a hung run is killed with everything it started. Returns exit codes and logs."""
    shared_env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD_SIZE),
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // WORLD_SIZE)),
        # Megatron-LM asks for it with TP > 1 (CUDA's kernel-queue setting; a no-op on CPU).
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTHONPATH": str(REPO),
    }
    processes, log_paths = [], [out / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    for rank, log_path in enumerate(log_paths):
        with open(log_path, "w") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.adapters.test_megatron_lm_pretrain", *argv],
                    env={**shared_env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    cwd=out,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        codes = [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        codes = [process.wait() for process in processes]
    return codes, [path.read_text(encoding="utf-8", errors="replace") for path in log_paths]


def probe_main(argv: list[str]) -> None:
    """Run the example as ``__main__`` with one addition: during iteration 1 every training
    micro-batch is scored again by EAFTForwardStep (same batch, same weights, no grad, no
    dropout to draw), and the last rank prints its ``lm loss`` [sum, count]."""
    import runpy

    from megatron.training import get_args

    from megatron_eaft.megatron import megatron_lm
    from megatron_eaft.megatron.loss import EAFTForwardStep, unwrap_model

    read_batch, example_forward_step = megatron_lm.get_batch, megatron_lm.forward_step
    batches: list[dict] = []

    def recording_get_batch(*args, **kwargs):
        batches.append(read_batch(*args, **kwargs))
        return batches[-1]

    def forward_step(data_iterator, model, return_schedule_plan: bool = False):
        result = example_forward_step(data_iterator, model, return_schedule_plan)
        args = get_args()
        if args.curr_iteration == 0 and unwrap_model(model).training:
            keys = ("tokens", "labels", "loss_mask", "position_ids")
            batch = {key: batches[-1][key] for key in keys}
            reference = EAFTForwardStep(megatron_lm.eaft_config_from_args(args), False)
            with torch.no_grad():
                output, loss_func = reference(iter([batch]), model)
                loss_sum, count = loss_func(output)[2]["lm loss"].tolist()
            if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
                print(f"{REFERENCE_PREFIX}: {loss_sum!r} {count!r}", flush=True)
        return result

    megatron_lm.get_batch = recording_get_batch
    megatron_lm.forward_step = forward_step  # the example imports it from megatron_lm
    sys.argv = [str(EXAMPLE), *argv]
    runpy.run_path(str(EXAMPLE), run_name="__main__")


def iteration_reports(log: str) -> dict[int, dict[str, float]]:
    """{iteration: {key: value}} from Megatron-LM's per-iteration console lines."""
    reports = {}
    for line in log.splitlines():
        found = ITERATION_LINE.search(line)
        if found:
            values = {key.strip(): float(value) for key, value in KEY_VALUE.findall(line)}
            reports[int(found.group(1))] = values
    return reports


@pytest.mark.slow  # a whole Megatron-LM pretrain() run (~25-40 s)
def test_example_trains_with_eaft_under_pretrain_at_tp2(tmp_path):
    codes, logs = run_example(tmp_path, ARGV)
    everything = "\n".join(f"--- rank {r} ---\n{log[-6000:]}" for r, log in enumerate(logs))
    assert codes == [0] * WORLD_SIZE, everything

    # Megatron-LM prints the iteration lines from the last rank.
    reports = iteration_reports(logs[-1])
    assert sorted(reports) == list(range(1, TRAIN_ITERS + 1)), everything
    for iteration, report in reports.items():
        for key in EAFT_KEYS:
            assert key in report, f"iteration {iteration}: no {key!r} in {report}"
            assert math.isfinite(report[key]), f"iteration {iteration}: {key}={report[key]}"
        assert report["number of skipped iterations"] == 0
        assert report["number of nan iterations"] == 0
        assert math.isfinite(report["grad norm"]) and report["grad norm"] > 0
        # Weights are in [0, 1]: the optimised loss never exceeds the plain cross-entropy.
        assert 0 < report["eaft/mean_weight"] <= 1
        assert 0 < report["eaft loss"] <= report["lm loss"]
        assert 0 <= report["eaft/confident_conflict_frac"] <= 1

    # Iteration 1's logged lm loss is the token mean of the unweighted CE over both
    # micro-batches, as EAFTForwardStep computes it on the same batches and weights.
    reference = [
        [float(value) for value in line.split(":", 1)[1].split()]
        for line in logs[-1].splitlines()
        if line.startswith(REFERENCE_PREFIX)
    ]
    assert len(reference) == 2, everything  # global batch 4 = 2 micro-batches of 2
    expected = sum(pair[0] for pair in reference) / sum(pair[1] for pair in reference)
    assert reports[1]["lm loss"] == pytest.approx(expected, rel=2e-6), (reports[1], reference)

    # Freshly initialised, the model is near uniform over the vocabulary: CE ~ ln V, and the
    # normalised top-K entropy (hence the EAFT weight) ~ 1.
    first = reports[1]
    assert abs(first["lm loss"] - math.log(VOCAB)) < 0.05, first
    assert first["eaft/mean_weight"] > 0.95, first
    assert first["eaft/mean_entropy"] > 0.95, first

    # Validation runs the same forward step in eval mode and reports every key too.
    validation = [line for line in logs[-1].splitlines() if "on validation set" in line]
    assert validation, everything
    for key in EAFT_KEYS:
        found = re.search(rf"\| {re.escape(key)} value: ([-+0-9.eE]+) \|", validation[-1])
        assert found and math.isfinite(float(found.group(1))), validation[-1]


if __name__ == "__main__":
    probe_main(sys.argv[1:])
