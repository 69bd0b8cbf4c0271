"""Forward+backward cost of the EAFT loss next to Megatron's plain cross-entropy, under TP.

Variants, all on the same vocab-parallel logits shard ``[T, 1, V/TP]`` and labels ``[T, 1]``:

  ce_megatron          Megatron-Core's ``vocab_parallel_cross_entropy`` (plain SFT): the anchor
  eaft_topk            ``megatron_eaft`` EAFT, top-K entropy (K = --topk)
  eaft_exact           ``megatron_eaft`` EAFT, exact full-vocabulary entropy
  eaft_official_style  tools/eaft_official_style.py: full fp32 copy + top-K on it, then Megatron's
                       CE (the authors' Megatron path, made TP-correct so the comparison is fair)

One spawned process per rank (no torchrun): gloo on CPU, NCCL with one GPU per rank on CUDA. For
each TP size the variants run interleaved in rounds, the order rotated every round (ABCD, BCDA,
...) so slow phases of a noisy machine hit every variant alike; warm-up rounds first. Ratios to
CE (and to the official style) are taken inside each round, then the median over rounds.

Time of a call is the slowest rank's. On CUDA: CUDA events (the goals use it). On CPU: wall
time and the process CPU time (user + system); with one thread per rank (the default) the CPU
time is the work done whatever else the machine runs, so the goals use it there.

Extra peak memory is what one fwd+bwd call needs above its inputs (the logits shard and labels,
allocated before), as a percentage of one logits shard in its input dtype:
  * CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call.
  * CPU, primary: every allocation and free of torch's CPU allocator during the first warm-up
    call, from torch.profiler's memory events (the CPU counterpart of max_memory_allocated;
    torch's CPU allocator does not cache, so this is what the process asks the OS for).
  * CPU, cross-check: resident-set high-water mark after ``malloc_trim(0)`` and a reset of the
    kernel's peak counter (``/proc/self/clear_refs`` = 5), read from VmHWM - VmRSS, per timed
    call (median over rounds). It also sees memory outside torch's allocator.

Goals (from the project's issue) are printed next to the measured values; "met" is computed
from the measurements of this run, nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

SCHEMA = "megatron_eaft.bench_loss/1"
VARIANTS: dict[str, str] = {
    "ce_megatron": "Megatron vocab_parallel_cross_entropy (plain SFT)",
    "eaft_topk": "megatron_eaft EAFT, top-K entropy",
    "eaft_exact": "megatron_eaft EAFT, exact entropy",
    "eaft_official_style": "official-style EAFT (fp32 copy + top-K, TP-corrected)",
}
OURS = ("eaft_topk", "eaft_exact")
ANCHOR = "ce_megatron"
OFFICIAL = "eaft_official_style"
GOAL_EXACT_VS_CE = 1.10
GOAL_VS_OFFICIAL = 0.5
GOAL_EXTRA_MEMORY_PCT = 5.0
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- measurement


class _Clock:
    """Time of one call on this rank, in ms: ``wall`` (CUDA events on GPU, perf_counter on
    CPU) and, on CPU, ``cpu``: the process's user + system CPU time. With one thread per rank
    the CPU time is the work the call did, whatever else the machine was running; the wall
    time also counts the moments the rank sat descheduled."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time_ms(self, call: Callable[[], Any]) -> tuple[dict[str, float | None], Any]:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = call()
            end.record()
            end.synchronize()
            return {"wall": start.elapsed_time(end), "cpu": None}, result
        wall_s, cpu_s = time.perf_counter(), time.process_time()
        result = call()
        cpu_s, wall_s = time.process_time() - cpu_s, time.perf_counter() - wall_s
        return {"wall": wall_s * 1e3, "cpu": cpu_s * 1e3}, result


class _ResidentPeak:
    """Linux RSS high-water mark around one call, or unavailable (returns None)."""

    def __init__(self) -> None:
        self.available = sys.platform == "linux" and os.access("/proc/self/clear_refs", os.W_OK)
        self._libc = None
        if self.available:
            with contextlib.suppress(OSError):
                self._libc = ctypes.CDLL("libc.so.6")

    @staticmethod
    def _status_bytes(field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} missing from /proc/self/status")

    def start(self) -> int | None:
        if not self.available:
            return None
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed heap pages back, so reuse is not hidden
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.available = False
            return None
        return self._status_bytes("VmRSS")

    def stop(self, base: int | None) -> int | None:
        if base is None or not self.available:
            return None
        return self._status_bytes("VmHWM") - base


def _allocator_peak_from_profile(prof: torch.profiler.profile) -> int | None:
    """Peak of torch's running CPU allocation total over a profiled window, in bytes."""
    try:
        from torch._C._profiler import _EventType

        events = []
        pending = list(prof.profiler.kineto_results.experimental_event_tree())
        while pending:
            node = pending.pop()
            pending.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                fields = node.extra_fields
                events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
    except (AttributeError, ImportError, RuntimeError):
        return None
    if not events:
        return 0
    events.sort()
    # The running total is process-wide; measure from its value just before the first event.
    base = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - base


# ----------------------------------------------------------------------------- the variants


def _variant_functions(
    labels: torch.Tensor, group: dist.ProcessGroup, topk: int
) -> dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """name -> fn(logits) that runs fwd+bwd and returns (per-token loss, per-token CE, grad)."""
    from eaft_official_style import official_style_eaft_loss
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_eaft.ops import EAFTConfig, vocab_parallel_weighted_cross_entropy

    def megatron_ce(logits):
        ce = vocab_parallel_cross_entropy(logits, labels, tp_group=group)
        (grad,) = torch.autograd.grad(ce.sum(), logits)
        return ce.detach(), ce.detach(), grad

    def ours(entropy: str):
        config = EAFTConfig(kind="eaft", entropy=entropy, topk=topk)

        def run(logits):
            out = vocab_parallel_weighted_cross_entropy(logits, labels, config, group)
            (grad,) = torch.autograd.grad(out.loss.sum(), logits)
            return out.loss.detach(), out.ce, grad

        return run

    def official(logits):
        loss = official_style_eaft_loss(logits, labels, group, topk=topk)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        return loss.detach(), None, grad

    return {
        "ce_megatron": megatron_ce,
        "eaft_topk": ours("topk"),
        "eaft_exact": ours("exact"),
        "eaft_official_style": official,
    }


# ----------------------------------------------------------------------------- one rank


def _max_over_ranks(
    values: list[float | None], group: dist.ProcessGroup, device: torch.device
) -> list[float | None]:
    """Element-wise max over the group (a TP step is as slow as its slowest rank)."""
    data = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
    data = data.to(device)
    dist.all_reduce(data, op=dist.ReduceOp.MAX, group=group)  # NaN (unavailable) propagates
    return [None if math.isnan(v) else float(v) for v in data.tolist()]


def _make_inputs(options: dict, tp: int, rank: int, device: torch.device):
    """This rank's logits shard [T, 1, V/TP] and the (identical on all ranks) labels [T, 1]."""
    tokens, vocab = options["tokens"], options["vocab"]
    labels_gen = torch.Generator().manual_seed(options["seed"])
    labels = torch.randint(0, vocab, (tokens, 1), generator=labels_gen).to(device)
    shard_gen = torch.Generator(device=device).manual_seed(options["seed"] + 1 + rank)
    # Written in the input dtype directly: no transient fp32 tensor inflating the RSS baseline.
    logits = torch.randn(
        tokens, 1, vocab // tp, generator=shard_gen, dtype=DTYPES[options["dtype"]], device=device
    )
    logits.mul_(2.0)
    return logits, labels


def _bench_tp(options: dict, tp: int, rank: int, device: torch.device) -> dict | None:
    group = dist.new_group(ranks=list(range(tp)))  # collective: every rank calls it
    if rank >= tp:
        return None
    if device.type == "cpu":
        torch.set_num_threads(options["threads"] or max(1, (os.cpu_count() or 1) // tp))
    logits, labels = _make_inputs(options, tp, rank, device)
    shard_bytes = logits.numel() * logits.element_size()
    fp32_input = logits.dtype == torch.float32
    functions = _variant_functions(labels, group, options["topk"])
    names = list(VARIANTS)
    clock = _Clock(device)
    rss = _ResidentPeak() if device.type == "cpu" else None
    if not fp32_input:
        logits.requires_grad_()

    def call(name: str, profile_memory: bool = False) -> dict:
        # fp32 logits are overwritten in place by every variant (as in Megatron): fresh copy.
        x = logits.detach().clone().requires_grad_() if fp32_input else logits
        dist.barrier(group=group)
        cuda_base = rss_base = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_base = torch.cuda.memory_allocated()
        elif rss is not None and not profile_memory:
            rss_base = rss.start()
        if profile_memory:
            activities = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
                times, result = clock.time_ms(lambda: functions[name](x))
            alloc_peak = _allocator_peak_from_profile(prof)
        else:
            times, result = clock.time_ms(lambda: functions[name](x))
            alloc_peak = None
        if device.type == "cuda":
            alloc_peak = torch.cuda.max_memory_allocated() - cuda_base
        rss_peak = rss.stop(rss_base) if rss is not None else None
        loss, ce, _grad = result
        return {**times, "alloc_peak": alloc_peak, "rss_peak": rss_peak, "loss": loss, "ce": ce}

    # Warm-up. On CPU the first warm-up call of each variant is the profiled one that gives
    # torch's allocator peak; its outputs also check that the variants compute the same loss.
    first: dict[str, dict] = {}
    for warm_round in range(options["warmup"]):
        for name in names:
            profiled = device.type == "cpu" and warm_round == 0
            record = call(name, profile_memory=profiled)
            if warm_round == 0:
                first[name] = record
    agreement = {
        "max_abs_diff_ce_ours_vs_megatron": float(
            (first["eaft_exact"]["ce"] - first[ANCHOR]["ce"]).abs().max()
        ),
        "max_abs_diff_loss_topk_ours_vs_official_style": float(
            (first["eaft_topk"]["loss"] - first[OFFICIAL]["loss"]).abs().max()
        ),
    }
    agreement = dict(
        zip(agreement, _max_over_ranks(list(agreement.values()), group, device), strict=True)
    )

    rounds: list[dict[str, dict]] = []
    for round_index in range(options["rounds"]):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        measured = {}
        for name in order:
            record = call(name)
            keys = ("wall", "cpu", "alloc_peak", "rss_peak")
            values = _max_over_ranks([record[key] for key in keys], group, device)
            measured[name] = dict(zip(keys, values, strict=True))
        rounds.append({"order": order, "measured": measured})
    if device.type == "cpu":
        cpu_alloc = _max_over_ranks([first[name]["alloc_peak"] for name in names], group, device)
        for name, peak in zip(names, cpu_alloc, strict=True):
            for one_round in rounds:
                one_round["measured"][name]["alloc_peak"] = peak
    return {
        "tp": tp,
        "shard_shape": list(logits.shape),
        "shard_bytes": shard_bytes,
        "threads_per_rank": torch.get_num_threads() if device.type == "cpu" else None,
        "agreement": agreement,
        "rounds": rounds,
    }


def _join_benchmark(rank: int, world: int, options: dict) -> torch.device:
    """One benchmark rank: megatron imported, this rank's device, the process group."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Every rank pays megatron's import now, side by side: done lazily, a rank that sits out
    # the first TP size would pay it afterwards while the others wait.
    import megatron.core.tensor_parallel  # noqa: F401

    device = torch.device(options["device"])
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{options['port']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=options["timeout_s"]),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    return device


def _rank_main(rank: int, world: int, options: dict, result_path: str) -> None:
    device = _join_benchmark(rank, world, options)
    try:
        per_tp = []
        for tp in options["tp"]:
            result = _bench_tp(options, tp, rank, device)
            per_tp.append(result)
            dist.barrier()  # ranks outside this TP size wait here, so phases never overlap
        if rank == 0:
            with open(result_path, "w") as handle:
                json.dump(per_tp, handle)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- summary


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _pct(value: float | None, shard_bytes: int) -> float | None:
    return None if value is None else 100.0 * value / shard_bytes


def _timing(rounds: list[dict], name: str, clock: str) -> dict | None:
    """One variant's times under one clock, and its ratios to CE and to the official style
    taken inside each round (both ran back to back there) before the median over rounds."""

    def times(variant: str) -> list[float]:
        return [r["measured"][variant][clock] for r in rounds]

    own = times(name)
    if any(value is None for value in own):
        return None
    to_ce = [v / c for v, c in zip(own, times(ANCHOR), strict=True)]
    to_official = [v / o for v, o in zip(own, times(OFFICIAL), strict=True)]
    return {
        "ms_per_round": own,
        "ms_median": statistics.median(own),
        "ms_min": min(own),
        "ratio_vs_ce_per_round": to_ce,
        "ratio_vs_ce_median": statistics.median(to_ce),
        # Noise on a shared machine only ever adds time: the ratio of the fastest calls is a
        # second estimate of the intrinsic ratio.
        "ratio_vs_ce_of_min": min(own) / min(times(ANCHOR)),
        "ratio_vs_official_style_median": statistics.median(to_official),
    }


def _summarise(raw: dict, goal_clock: str) -> dict:
    rounds, shard = raw["rounds"], raw["shard_bytes"]

    def peak(name: str, key: str) -> float | None:
        return _median([r["measured"][name][key] for r in rounds])

    def over_ce(name: str, key: str) -> float | None:
        own, ce = peak(name, key), peak(ANCHOR, key)
        return None if own is None or ce is None else _pct(own - ce, shard)

    variants = {
        name: {
            "label": label,
            "time": {clock: _timing(rounds, name, clock) for clock in ("wall", "cpu")},
            "extra_peak_bytes": peak(name, "alloc_peak"),
            "extra_peak_pct_of_shard": _pct(peak(name, "alloc_peak"), shard),
            "extra_peak_over_ce_pct_of_shard": over_ce(name, "alloc_peak"),
            "rss_extra_peak_bytes": peak(name, "rss_peak"),
            "rss_extra_peak_pct_of_shard": _pct(peak(name, "rss_peak"), shard),
            "rss_extra_peak_over_ce_pct_of_shard": over_ce(name, "rss_peak"),
        }
        for name, label in VARIANTS.items()
    }
    goals = []

    def goal(name: str, target: str, measured: float | None, met: bool | None) -> None:
        goals.append({"goal": name, "target": target, "measured": measured, "met": met})

    def timed(name: str, key: str) -> float:
        return variants[name]["time"][goal_clock][key]

    exact = timed("eaft_exact", "ratio_vs_ce_median")
    goal("eaft_exact time / CE", f"<= {GOAL_EXACT_VS_CE}", exact, exact <= GOAL_EXACT_VS_CE)
    goal(
        "eaft_topk time / CE",
        "as close to 1 as the platform allows",
        timed("eaft_topk", "ratio_vs_ce_median"),
        None,
    )
    for name in OURS:
        ratio = timed(name, "ratio_vs_official_style_median")
        goal(
            f"{name} time / official-style",
            f"<= {GOAL_VS_OFFICIAL}",
            ratio,
            ratio <= GOAL_VS_OFFICIAL,
        )
    for name in OURS:
        over = variants[name]["extra_peak_over_ce_pct_of_shard"]
        goal(
            f"{name} extra peak memory over CE, % of shard",
            f"<= {GOAL_EXTRA_MEMORY_PCT}",
            over,
            None if over is None else over <= GOAL_EXTRA_MEMORY_PCT,
        )
    summary = {key: value for key, value in raw.items() if key != "rounds"}
    summary["rounds"] = [r["order"] for r in rounds]
    return {**summary, "goal_clock": goal_clock, "variants": variants, "goals": goals}


def _format(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _print_table(result: dict, memory_source: str) -> None:
    shard_mib = result["shard_bytes"] / 2**20
    threads = result["threads_per_rank"]
    print(
        f"\nTP={result['tp']}  logits shard {result['shard_shape']} = {shard_mib:.0f} MiB"
        + (f", {threads} thread(s)/rank" if threads else "")
    )
    columns = (  # (header, second header line, width)
        ("variant", "", 21),
        ("wall ms", "median", 9),
        ("wall/CE", "median", 8),
        ("cpu ms", "median", 9),
        ("cpu/CE", "median", 8),
        ("cpu/CE", "rounds", 11),
        ("cpu/CE", "min/min", 8),
        ("extra peak", "% shard", 11),
        ("over CE", "% shard", 9),
        ("RSS extra", "% shard", 10),
    )
    for line in (0, 1):
        print(
            "".join(
                f"{column[line]:{'<' if i == 0 else '>'}{column[2]}}"
                for i, column in enumerate(columns)
            )
        )
    for name, row in result["variants"].items():
        wall, cpu = row["time"]["wall"], row["time"]["cpu"] or {}
        spread = cpu.get("ratio_vs_ce_per_round")
        cells = (
            name,
            _format(wall["ms_median"], ".0f"),
            _format(wall["ratio_vs_ce_median"], ".3f"),
            _format(cpu.get("ms_median"), ".0f"),
            _format(cpu.get("ratio_vs_ce_median"), ".3f"),
            f"{min(spread):.2f}-{max(spread):.2f}" if spread else "n/a",
            _format(cpu.get("ratio_vs_ce_of_min"), ".3f"),
            _format(row["extra_peak_pct_of_shard"], ".1f"),
            _format(row["extra_peak_over_ce_pct_of_shard"], "+.1f"),
            _format(row["rss_extra_peak_pct_of_shard"], ".1f"),
        )
        print(
            "".join(
                f"{cell:{'<' if i == 0 else '>'}{column[2]}}"
                for i, (cell, column) in enumerate(zip(cells, columns, strict=True))
            )
        )
    print(f"(extra peak: {memory_source}; RSS extra: VmHWM cross-check, CPU only)")
    print(f"goals, times from the {result['goal_clock']} clock:")
    for goal in result["goals"]:
        verdict = {True: "MET", False: "MISSED", None: "(no fixed bar)"}[goal["met"]]
        print(
            f"  {goal['goal']:<48} measured {_format(goal['measured'], '.3f'):>7}"
            f"  target {goal['target']}: {verdict}"
        )


# ----------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens per call")
    parser.add_argument("--vocab", type=int, default=151936, help="V, the full vocabulary")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes to run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits dtype")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (ABCD each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (>= 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per rank (0: cores / TP). Default 1: on a shared CPU, intra-op "
        "threads of small ops wait on each other whenever one is descheduled",
    )
    parser.add_argument(
        "--cpu-huge-pages",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="CPU: back torch's large allocations with transparent huge pages "
        "(THP_MEM_ALLOC_ENABLE=1): about half the wall time, since every variant allocates GBs "
        "per call, but on a busy machine the CPU time then swings with page compaction",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/bench_loss.json"))
    args = parser.parse_args(argv)
    problems = []
    if args.tokens < 1:
        problems.append(f"--tokens {args.tokens} must be >= 1")
    if args.rounds < 1:
        problems.append(f"--rounds {args.rounds} must be >= 1")
    if args.warmup < 1:
        problems.append(f"--warmup {args.warmup} must be >= 1 (the first warm-up call is profiled)")
    for tp in args.tp:
        if tp < 1 or args.vocab % tp:
            problems.append(f"--tp {tp} must be >= 1 and divide --vocab {args.vocab}")
    if not 2 <= args.topk <= args.vocab:
        problems.append(f"--topk {args.topk} must be in [2, --vocab]")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            problems.append("--device cuda but torch sees no CUDA device")
        elif max(args.tp) > torch.cuda.device_count():
            problems.append(
                f"--tp {max(args.tp)} needs that many GPUs, found {torch.cuda.device_count()}"
            )
    if problems:
        parser.error("; ".join(problems))
    return args


def _environment(device: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        megatron_version = version("megatron-core")
    except PackageNotFoundError:
        megatron_version = None
    env = {
        "torch": torch.__version__,
        "megatron_core": megatron_version,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    else:
        with contextlib.suppress(OSError):
            env["transparent_hugepage"] = (
                Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
            )
    return env


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    huge_pages = args.device == "cpu" and args.cpu_huge_pages
    if huge_pages:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read by torch in the spawned ranks
    options = {
        "tokens": args.tokens,
        "vocab": args.vocab,
        "tp": sorted(set(args.tp)),
        "dtype": args.dtype,
        "device": args.device,
        "topk": args.topk,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "threads": args.threads,
        "cpu_huge_pages": huge_pages,
        "seed": args.seed,
        "timeout_s": args.timeout_s,
        "port": _free_port(),
    }
    memory_source = (
        "torch.cuda.max_memory_allocated delta"
        if args.device == "cuda"
        else "torch CPU allocator peak (profiler memory events)"
    )
    environment = _environment(args.device)
    world = max(options["tp"])
    print(
        f"bench_loss: T={args.tokens} V={args.vocab} {args.dtype} on {args.device}, TP {options['tp']}, "
        f"{args.warmup} warm-up + {args.rounds} timed rounds, K={args.topk}"
        + (
            f", {args.threads or 'cores/TP'} thread(s)/rank, huge pages {huge_pages}"
            if args.device == "cpu"
            else ""
        ),
        flush=True,
    )
    started = time.perf_counter()
    # The tools directory must be importable in the spawned ranks (eaft_official_style).
    tools_dir = str(Path(__file__).resolve().parent)
    if tools_dir not in sys.path:
        sys.path.insert(0, tools_dir)
    with tempfile.TemporaryDirectory(prefix="bench_loss_") as scratch:
        result_path = os.path.join(scratch, "rank0.json")
        torch_mp.start_processes(
            _rank_main,
            args=(world, options, result_path),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        with open(result_path) as handle:
            raw_per_tp = json.load(handle)
    # Wall time on a GPU; on CPU the per-rank CPU time when each rank has one thread (more
    # threads would count their spin-waits as work).
    goal_clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    results = [_summarise(raw, goal_clock) for raw in raw_per_tp]
    for result in results:
        _print_table(result, memory_source)
    environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    payload = {
        "schema": SCHEMA,
        "config": {k: v for k, v in options.items() if k != "port"},
        "environment": environment,
        "wall_s": time.perf_counter() - started,
        "memory_method": {
            "extra_peak": memory_source,
            "rss_extra_peak": (
                "Linux VmHWM - VmRSS after malloc_trim(0) and clear_refs=5, per timed call"
                if args.device == "cpu"
                else None
            ),
            "shard": "one logits shard [T, 1, V/TP] in the input dtype",
        },
        "variants": VARIANTS,
        "results": results,
    }
    _write_json_atomically(args.out, payload)
    print(f"\nwrote {args.out} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
