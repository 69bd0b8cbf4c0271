"""Output layer + loss, forward and backward: unfused (logits materialised) vs the fused path.

Variants, all from the same hidden states ``[T, h]`` and output-weight shard ``[V/TP, h]``
(gradients of both are computed):

  matmul_ce_megatron   logits = hidden @ W^T, then Megatron's vocab_parallel_cross_entropy
  matmul_eaft_topk     logits = hidden @ W^T, then megatron_eaft's EAFT (top-K entropy)
  matmul_eaft_exact    the same with the exact entropy
  fused_eaft_topk      megatron_eaft.ops.fused_output_weighted_cross_entropy (top-K entropy)
  fused_eaft_exact     the same with the exact entropy
  fused_*_forward      the same with gradient="forward": both gradients formed in the forward
                       pass (one GEMM fewer; an fp32 weight-sized buffer until backward)

Every (T, V, h) of the grid runs at each TP size, one spawned process per rank (gloo on CPU,
NCCL with a GPU per rank on CUDA), variants interleaved in rotated rounds after a warm-up round
as in tools/bench_loss.py, whose clocks and memory probes this tool reuses. Reported per
variant: time (median over rounds of the slowest rank; the per-process CPU time on CPU with one
thread per rank, CUDA events on GPU) and peak memory above the inputs (torch's CPU allocator
peak from the profiler's memory events in the warm-up call; torch.cuda.max_memory_allocated on
GPU), and the ratios fused / unfused with the same entropy.

``--trace-memory`` measures peak memory only, without running the kernels: each variant's
forward and backward run under torch's FakeTensorMode (tensors with shapes and no storage), in
this process, as rank 0 of a fake process group of TP ranks (the ranks hold equal shards), and
torch's MemTracker adds up every tensor storage while it lives. So every size of the grid can be
traced on any machine, those whose logits exceed its memory included, in seconds to minutes.
What it does not see: memory that kernels allocate for themselves (GEMM packing, sort scratch).
It runs the accelerator's asynchronous label check, not the CPU's host read (a fake tensor has
no value to read); both hold O(T) flags.

Goals (the project's issue): fused peak / unfused peak <= 0.25 at V = 248320, T = 16384; fused
time <= 1.15x unfused on CPU. "met" is computed from this run's measurements only (traced ones
are printed as such).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import (  # the tools directory is not a package: imported by path
    DTYPES,
    _allocator_peak_from_profile,
    _Clock,
    _environment,
    _free_port,
    _join_benchmark,
    _max_over_ranks,
    _median,
    _write_json_atomically,
)

SCHEMA = "megatron_eaft.bench_fused/1"
VARIANTS: dict[str, str] = {
    "matmul_ce_megatron": "output matmul + Megatron vocab_parallel_cross_entropy",
    "matmul_eaft_topk": "output matmul + megatron_eaft EAFT, top-K entropy",
    "matmul_eaft_exact": "output matmul + megatron_eaft EAFT, exact entropy",
    "fused_eaft_topk": "fused output layer + EAFT, top-K entropy",
    "fused_eaft_exact": "fused output layer + EAFT, exact entropy",
    "fused_eaft_topk_forward": "fused, top-K entropy, gradients formed in the forward pass",
    "fused_eaft_exact_forward": "fused, exact entropy, gradients formed in the forward pass",
}
FUSED_VS_UNFUSED = {
    "fused_eaft_topk": "matmul_eaft_topk",
    "fused_eaft_exact": "matmul_eaft_exact",
    "fused_eaft_topk_forward": "matmul_eaft_topk",
    "fused_eaft_exact_forward": "matmul_eaft_exact",
}
GOAL_PEAK_RATIO = 0.25
GOAL_PEAK_AT = {"vocab": 248320, "tokens": 16384}
GOAL_TIME_RATIO = 1.15


def _variant_functions(
    labels: torch.Tensor,
    group: dist.ProcessGroup,
    topk: int,
    chunk_tokens: int | None,
    main_grad: torch.Tensor | None,
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> fn(hidden, weight) running fwd+bwd into hidden.grad and the weight's gradient;
    returns the per-token loss. With ``main_grad`` (Megatron's DDP: an fp32 buffer per
    parameter) the weight gradient ends there: the unfused paths add weight.grad into it as
    DDP's hook does, the fused one adds each chunk straight into it."""

    def into_main_grad(weight):
        if main_grad is not None:
            main_grad.add_(weight.grad)
            weight.grad = None

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_eaft.ops import (
        EAFTConfig,
        fused_output_weighted_cross_entropy,
        vocab_parallel_weighted_cross_entropy,
    )

    def megatron_ce(hidden, weight):
        ce = vocab_parallel_cross_entropy(hidden @ weight.t(), labels, tp_group=group)
        ce.sum().backward()
        into_main_grad(weight)
        return ce.detach()

    def unfused(entropy: str):
        config = EAFTConfig(kind="eaft", entropy=entropy, topk=topk)

        def run(hidden, weight):
            out = vocab_parallel_weighted_cross_entropy(hidden @ weight.t(), labels, config, group)
            out.loss.sum().backward()
            into_main_grad(weight)
            return out.loss.detach()

        return run

    def fused(entropy: str, gradient: str = "recompute"):
        config = EAFTConfig(kind="eaft", entropy=entropy, topk=topk)

        def run(hidden, weight):
            out = fused_output_weighted_cross_entropy(
                hidden,
                weight,
                labels,
                config,
                group,
                chunk_tokens=chunk_tokens,
                main_grad=main_grad,
                gradient=gradient,
            )
            out.loss.sum().backward()
            return out.loss.detach()

        return run

    return {
        "matmul_ce_megatron": megatron_ce,
        "matmul_eaft_topk": unfused("topk"),
        "matmul_eaft_exact": unfused("exact"),
        "fused_eaft_topk": fused("topk"),
        "fused_eaft_exact": fused("exact"),
        "fused_eaft_topk_forward": fused("topk", "forward"),
        "fused_eaft_exact_forward": fused("exact", "forward"),
    }


def _case_inputs(
    options: dict, case: dict, tp: int, rank: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(labels [T], hidden [T, h], this rank's weight shard [V/TP, h], its fp32 main_grad or
    None): seeded, the same on every run; fake tensors under --trace-memory's FakeTensorMode."""
    tokens, vocab, hidden_size = case["tokens"], case["vocab"], case["hidden"]
    dtype = DTYPES[options["dtype"]]
    generator = torch.Generator().manual_seed(options["seed"])
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(dtype).to(device)
    weight_gen = torch.Generator().manual_seed(options["seed"] + 1 + rank)
    weight = (torch.randn(vocab // tp, hidden_size, generator=weight_gen) * 0.05).to(dtype)
    weight = weight.to(device)
    hidden.requires_grad_()
    weight.requires_grad_()
    main_grad = None
    if options["main_grad"]:
        main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    return labels, hidden, weight, main_grad


def _logits_shard_bytes(options: dict, case: dict, tp: int) -> int:
    element = torch.empty((), dtype=DTYPES[options["dtype"]]).element_size()
    return case["tokens"] * (case["vocab"] // tp) * element


def _bench_case(options: dict, case: dict, tp: int, rank: int, device: torch.device) -> dict:
    group = dist.new_group(ranks=list(range(tp)))  # collective: every rank calls it
    if rank >= tp:
        return {}
    if device.type == "cpu":
        torch.set_num_threads(options["threads"] or max(1, (os.cpu_count() or 1) // tp))
    labels, hidden, weight, main_grad = _case_inputs(options, case, tp, rank, device)
    functions = _variant_functions(
        labels, group, options["topk"], options["chunk_tokens"], main_grad
    )
    names = [name for name in VARIANTS if name in options["variants"]]
    clock = _Clock(device)

    def call(name: str, profile_memory: bool) -> dict:
        hidden.grad = weight.grad = None
        dist.barrier(group=group)
        cuda_base = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_base = torch.cuda.memory_allocated()
        if profile_memory:
            activities = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
                times, loss = clock.time_ms(lambda: functions[name](hidden, weight))
            peak = _allocator_peak_from_profile(prof)
        else:
            times, loss = clock.time_ms(lambda: functions[name](hidden, weight))
            peak = None
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - cuda_base
        return {**times, "peak": peak, "loss": loss}

    first = {name: call(name, profile_memory=device.type == "cpu") for name in names}
    agreement = {
        fused: float((first[fused]["loss"] - first[unfused]["loss"]).abs().max())
        for fused, unfused in FUSED_VS_UNFUSED.items()
        if fused in first and unfused in first
    }
    rounds = []
    for round_index in range(options["rounds"]):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        measured = {}
        for name in order:
            record = call(name, profile_memory=False)
            values = _max_over_ranks([record["wall"], record["cpu"]], group, device)
            measured[name] = {"wall": values[0], "cpu": values[1]}
        rounds.append({"order": order, "measured": measured})
    peaks = _max_over_ranks(
        [first[name]["peak"] if device.type == "cpu" else None for name in names], group, device
    )
    if device.type == "cuda":  # the warm-up call's peak on every rank
        peaks = _max_over_ranks([first[name]["peak"] for name in names], group, device)
    return {
        "case": case,
        "tp": tp,
        "logits_shard_bytes": _logits_shard_bytes(options, case, tp),
        "loss_max_abs_diff_fused_vs_unfused": agreement,
        "peak_bytes": dict(zip(names, peaks, strict=True)),
        "rounds": rounds,
    }


def _traced_case(options: dict, case: dict, tp: int, group: dist.ProcessGroup) -> dict:
    """One size at one TP under --trace-memory: the peak above the inputs of each variant."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    names = [name for name in VARIANTS if name in options["variants"]]
    peaks = {}
    with FakeTensorMode():
        labels, hidden, weight, main_grad = _case_inputs(options, case, tp, 0, torch.device("cpu"))
        inputs = [t for t in (labels, hidden, weight, main_grad) if t is not None]
        input_bytes = sum(t.numel() * t.element_size() for t in inputs)
        functions = _variant_functions(
            labels, group, options["topk"], options["chunk_tokens"], main_grad
        )
        for name in names:
            hidden.grad = weight.grad = None
            tracker = MemTracker()
            tracker.track_external(*inputs)
            with tracker:
                functions[name](hidden, weight)
            peak = tracker.get_tracker_snapshot("peak")
            peaks[name] = sum(device["Total"] for device in peak.values()) - input_bytes
    return {
        "case": case,
        "tp": tp,
        "logits_shard_bytes": _logits_shard_bytes(options, case, tp),
        "loss_max_abs_diff_fused_vs_unfused": {},
        "peak_bytes": peaks,
        "rounds": [],
        "traced": True,
    }


def _trace_memory(options: dict) -> list[dict]:
    """--trace-memory: every size and TP of the grid traced in this process (see the top)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_eaft.ops import vocab_parallel

    # A fake tensor has no value for the CPU's host-side label check to read.
    checks_sync = vocab_parallel.checks_sync
    vocab_parallel.checks_sync = lambda config, device: False
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=max(options["tp"]))
    try:
        groups = {tp: dist.new_group(ranks=list(range(tp))) for tp in options["tp"]}
        return [
            _traced_case(options, case, tp, groups[tp])
            for case, tp in itertools.product(options["cases"], options["tp"])
        ]
    finally:
        dist.destroy_process_group()
        vocab_parallel.checks_sync = checks_sync


def _rank_main(rank: int, world: int, options: dict, result_path: str) -> None:
    device = _join_benchmark(rank, world, options)
    try:
        results = []
        for case, tp in itertools.product(options["cases"], options["tp"]):
            results.append(_bench_case(options, case, tp, rank, device))
            dist.barrier()
        if rank == 0:
            with open(result_path, "w") as handle:
                json.dump(results, handle)
    finally:
        dist.destroy_process_group()


def _summarise(raw: dict, clock: str) -> dict:
    names = list(raw["peak_bytes"])
    times = {name: _median([r["measured"][name][clock] for r in raw["rounds"]]) for name in names}
    ratios = {}
    for fused, unfused in FUSED_VS_UNFUSED.items():
        if fused in names and unfused in names:
            per_round = [
                r["measured"][fused][clock] / r["measured"][unfused][clock]
                for r in raw["rounds"]
                if r["measured"][fused][clock] and r["measured"][unfused][clock]
            ]
            peak_f, peak_u = raw["peak_bytes"][fused], raw["peak_bytes"][unfused]
            ratios[fused] = {
                "vs": unfused,
                "time_ratio_median": _median(per_round),
                "peak_ratio": peak_f / peak_u if peak_f is not None and peak_u else None,
            }
    return {**raw, "clock": clock, "time_ms_median": times, "fused_vs_unfused": ratios}


def _goal_lines(result: dict, device: str) -> list[str]:
    case, lines = result["case"], []
    for fused, ratio in result["fused_vs_unfused"].items():
        peak, elapsed = ratio["peak_ratio"], ratio["time_ratio_median"]
        if peak is not None and all(case[k] == v for k, v in GOAL_PEAK_AT.items()):
            met = "met" if peak <= GOAL_PEAK_RATIO else "NOT met"
            how = " (traced)" if result.get("traced") else ""
            lines.append(
                f"  goal {fused} peak / unfused <= {GOAL_PEAK_RATIO}: {peak:.3f} {met}{how}"
            )
        if elapsed is not None and device == "cpu":
            met = "met" if elapsed <= GOAL_TIME_RATIO else "NOT met"
            lines.append(
                f"  goal {fused} time / unfused <= {GOAL_TIME_RATIO} (CPU): {elapsed:.3f} {met}"
            )
    return lines


def _print_result(result: dict, device: str) -> None:
    case = result["case"]
    print(
        f"\nT={case['tokens']} V={case['vocab']} h={case['hidden']} TP={result['tp']} "
        f"(logits shard {result['logits_shard_bytes'] / 2**20:.0f} MiB, {result['clock']} clock)"
    )
    width = max(len(name) for name in result["time_ms_median"])
    print(
        f"  {'variant':<{width}} {'ms':>10} {'peak MiB':>10} {'time/unfused':>13} "
        f"{'peak/unfused':>13}"
    )
    for name, ms in result["time_ms_median"].items():
        peak = result["peak_bytes"][name]
        ratio = result["fused_vs_unfused"].get(name, {})
        time_ratio, peak_ratio = ratio.get("time_ratio_median"), ratio.get("peak_ratio")
        print(
            f"  {name:<{width}} {'-' if ms is None else f'{ms:.0f}':>10} "
            f"{(peak or float('nan')) / 2**20:>10.0f} "
            f"{'' if time_ratio is None else f'{time_ratio:.3f}':>13} "
            f"{'' if peak_ratio is None else f'{peak_ratio:.3f}':>13}"
        )
    for line in _goal_lines(result, device):
        print(line)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 248320])
    parser.add_argument("--hidden", type=int, nargs="+", default=[2560, 4096])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument(
        "--chunk-tokens", type=int, default=None, help="fused chunk (default: the 1 GiB budget)"
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up")
    parser.add_argument(
        "--main-grad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the weight gradient ends in an fp32 main_grad input buffer, as under Megatron's "
        "DDP (--no-main-grad: in weight.grad; the fused path then holds an fp32 accumulator)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads per rank (default: cores / TP)"
    )
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="peak memory only, traced under FakeTensorMode without running the kernels (any "
        "size on any machine; no times; see the module docstring)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--timeout-s", type=float, default=7200.0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/bench_fused.json"))
    args = parser.parse_args(argv)
    for tp in args.tp:
        if any(v % tp for v in args.vocab):
            parser.error(f"--tp {tp} does not divide every --vocab {args.vocab}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cases = [
        {"tokens": t, "vocab": v, "hidden": h}
        for t, v, h in itertools.product(args.tokens, args.vocab, args.hidden)
    ]
    options = {
        "cases": cases,
        "tp": sorted(set(args.tp)),
        "dtype": args.dtype,
        "device": args.device,
        "topk": args.topk,
        "chunk_tokens": args.chunk_tokens,
        "variants": args.variants,
        "rounds": args.rounds,
        "main_grad": args.main_grad,
        "threads": args.threads,
        "seed": args.seed,
        "timeout_s": args.timeout_s,
        "port": _free_port(),
    }
    clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    environment = _environment(args.device)
    started = time.perf_counter()
    if args.trace_memory:
        clock = "none (traced)"
        print(
            f"bench_fused --trace-memory: {len(cases)} size(s) x TP {options['tp']}, "
            f"{args.dtype}, K={args.topk}, peak memory traced under FakeTensorMode, no times",
            flush=True,
        )
        raw = _trace_memory(options)
    else:
        print(
            f"bench_fused: {len(cases)} size(s) x TP {options['tp']}, {args.dtype} on "
            f"{args.device}, 1 warm-up + {args.rounds} timed rounds, K={args.topk}, {clock} clock",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="bench_fused_") as scratch:
            result_path = os.path.join(scratch, "rank0.json")
            torch_mp.start_processes(
                _rank_main,
                args=(max(options["tp"]), options, result_path),
                nprocs=max(options["tp"]),
                join=True,
                start_method="spawn",
            )
            with open(result_path) as handle:
                raw = json.load(handle)
    results = [_summarise(one, clock) for one in raw]
    for result in results:
        _print_result(result, args.device)
    payload = {
        "schema": SCHEMA,
        "config": {k: v for k, v in options.items() if k != "port"},
        "environment": environment,
        "wall_s": time.perf_counter() - started,
        "memory_method": (
            "traced: tensor storages alive at the peak (FakeTensorMode + MemTracker) above the "
            "inputs, kernels' own workspaces not included"
            if args.trace_memory
            else "torch.cuda.max_memory_allocated delta"
            if args.device == "cuda"
            else "torch CPU allocator peak (profiler memory events) above the inputs"
        ),
        "variants": {k: v for k, v in VARIANTS.items() if k in args.variants},
        "results": results,
    }
    _write_json_atomically(args.out, payload)
    print(f"\nwrote {args.out} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
