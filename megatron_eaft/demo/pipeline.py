"""The README's first command: HF model -> Megatron -> EAFT fine-tuning at TP=2 -> HF, on CPU.

Stages (each timed; the equivalent CLI command is printed where there is one):

1. data: the general corpus and the unit-conversion SFT set (:mod:`megatron_eaft.demo.data`);
2. tokenizer: byte-level BPE with a ChatML template (:mod:`.tokenizer`);
3. pre-train: a tiny Qwen3 in plain torch on the general corpus, saved as HF (:mod:`.pretrain`);
4. convert import + verify: HF -> torch_dist, logits compared at TP=2;
5. prepare-data: the SFT chats -> packed, assistant-masked rows;
6. diagnose: the base model's (entropy, target probability) picture of the SFT data;
7. finetune: EAFT, then plain SFT for comparison, both at TP=2 over gloo;
8. convert export, then transformers: generate a sample, held-out accuracy, forgetting.

Megatron work runs on one :class:`~megatron_eaft.megatron.launcher.WorkerPool` of gloo ranks
(Megatron is imported once per rank, not once per stage); this process never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megatron_eaft.demo.pretrain import TINY_SHAPE, ModelShape, PretrainSettings
from megatron_eaft.megatron.launcher import WorkerPool
from megatron_eaft.outputs import write_text_atomically

MARKER_FILE = ".megatron-eaft-demo"
REPORT_JSON = "report.json"
REPORT_TEXT = "report.txt"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    general_documents: int = 800
    vocab_size: int = 1024
    shape: ModelShape = dataclasses.field(default_factory=ModelShape)
    pretrain: PretrainSettings = dataclasses.field(default_factory=PretrainSettings)
    seq_length: int = 128
    tensor_parallel: int = 2
    # From a grid (lr 1e-4/3e-4/1e-3 x 30/60/200 iterations, both losses, one seed), chosen as
    # the cell where plain SFT gets the most held-out conversions right: below 200 iterations
    # no model learned any conversion, not even the ones it trained on.
    iterations: int = 200
    global_batch_size: int = 16
    micro_batch_size: int = 4
    lr: float = 1e-3
    diagnose_tokens: int = 8_000
    general_eval_questions: int | None = None  # None: every general question
    domain_eval_questions: int = 60
    # Plain-text general documents scored during fine-tuning (eval.sets.general).
    general_eval_documents: int = 200
    compare_sft: bool = True
    held_out: str = "ends-in-7"  # a name in megatron_eaft.demo.data.HELD_OUT_RULES


FULL = DemoSettings()
# A few seconds of work per stage: the test of the whole pipeline.
QUICK = DemoSettings(
    general_documents=120,
    vocab_size=400,
    shape=TINY_SHAPE,
    pretrain=PretrainSettings(steps=8, batch_size=4, seq_length=64, warmup=2),
    seq_length=64,
    iterations=2,
    global_batch_size=4,
    micro_batch_size=2,
    diagnose_tokens=300,
    general_eval_questions=6,
    domain_eval_questions=6,
    general_eval_documents=8,
)


class DemoError(RuntimeError):
    """The demo cannot run or a stage failed its check; the message says which."""


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and all its children, live or reaped.

    The pool's gloo ranks are children, so a stage's CPU time includes its Megatron work; on a
    busy machine this is the number that says what the stage costs.
    """
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += child_times.user + child_times.system
    return total


@dataclasses.dataclass
class StageTimer:
    """Wall and CPU seconds per stage, logged as each stage ends."""

    log: Callable[[str], None]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, command: str | None = None) -> Iterator[None]:
        self.log(f"\n== {name}" + (f"   (CLI: {command})" if command else ""))
        started, cpu_started = time.perf_counter(), cpu_seconds()
        yield
        self.seconds[name] = time.perf_counter() - started
        self.cpu[name] = cpu_seconds() - cpu_started
        self.log(f"   {name}: {self.seconds[name]:.1f} s wall, {self.cpu[name]:.1f} s CPU")


def prepare_output_dir(out: Path, marker: str = MARKER_FILE, writer: str = "the demo") -> None:
    """Start from an empty ``out``; refuse to clear a directory ``writer`` did not create
    (the one holding its ``marker`` file)."""
    if out.exists() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise DemoError(
                f"{out} exists, is not empty and was not written by {writer}; choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text(f"written by {writer}; safe to delete\n")


def _prepare_in_worker(config: Any) -> Any:
    """prepare-data's entry point, run on a pool rank (which has Megatron-Core imported)."""
    from megatron_eaft.data.prepare import prepare_dataset

    return prepare_dataset(config)


def finetune_rank(config_path: str, threads: int | None = None) -> dict[str, Any] | None:
    """`megatron-eaft finetune --config CONFIG` on one rank of a pool job; the last rank reports.

    ``threads``: torch threads for this rank (e.g. 1 where several jobs share the cores).
    """
    import torch

    from megatron_eaft.train.config import load_config
    from megatron_eaft.train.trainer import run_training

    if threads is not None:
        torch.set_num_threads(threads)
    result = run_training(load_config(config_path))
    if torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
        return None
    return {
        "records": [record.as_dict() for record in result.records],
        "eval_losses": dict(result.eval_losses),
        "evaluations": dict(result.evaluations),
        "final_iteration": result.final_iteration,
    }


def evaluate_rank(config_path: str, threads: int | None = None) -> dict[str, Any] | None:
    """The trainer's evaluation of every eval set of a finetune config, without training: the
    base model's numbers on the same sets, measured by the same code as the fine-tunes'."""
    import torch

    from megatron_eaft.train.config import load_config
    from megatron_eaft.train.trainer import Trainer

    if threads is not None:
        torch.set_num_threads(threads)
    trainer = Trainer(load_config(config_path))
    try:
        result = trainer.evaluate()
    finally:
        trainer.close()
    if torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
        return None
    return result


def finetune_config(settings: DemoSettings, run_dir: Path, kind: str, paths: dict[str, Path]):
    """The YAML of one fine-tuning run (paths relative to it), as `megatron-eaft finetune` reads."""
    eval_interval = max(1, settings.iterations // 4)
    return {
        "model": {
            "checkpoint": os.path.relpath(paths["base_megatron"], run_dir),
            "dtype": "fp32",
            "transformer_impl": "local",
        },
        "parallel": {"tensor": settings.tensor_parallel},
        "data": {
            "path": os.path.relpath(paths["sft_data"], run_dir),
            "eval_path": os.path.relpath(paths["sft_eval"], run_dir),
            "micro_batch_size": settings.micro_batch_size,
            "global_batch_size": settings.global_batch_size,
        },
        "train": {"iterations": settings.iterations},
        "optimizer": {
            "lr": settings.lr,
            "min_lr": settings.lr / 10,
            "warmup_fraction": 0.1,
            "weight_decay": 0.0,
        },
        "eaft": {"kind": kind, "check_finite": True},
        "checkpoint": {"save": "checkpoints"},
        # data.eval_path (the held-out conversions) as eval/lm loss; the general text as
        # eval/general/lm loss: is the model forgetting while it learns?
        "eval": {
            "interval": eval_interval,
            "iterations": 2,
            "sets": {"general": os.path.relpath(paths["general_eval"], run_dir)},
        },
        "logging": {
            "interval": max(1, settings.iterations // 10),
            "tensorboard_dir": "tensorboard",
            "metrics_file": "metrics.jsonl",
        },
    }


def _write_yaml(path: Path, payload: dict[str, Any]) -> None:
    import yaml

    write_text_atomically(path, yaml.safe_dump(payload, sort_keys=False))


def run_demo(
    out: Path,
    settings: DemoSettings = FULL,
    log: Callable[[str], None] = print,
    pool: WorkerPool | None = None,
) -> dict[str, Any]:
    """Run every stage into ``out`` (emptied first); returns the report (also written there).

    ``pool``: gloo worker ranks to run Megatron on (at least ``settings.tensor_parallel``);
    by default a pool is started for the run and closed after it.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    out = Path(out).absolute()
    prepare_output_dir(out)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    timer = StageTimer(log)
    report: dict[str, Any] = {"settings": dataclasses.asdict(settings), "out": str(out)}
    paths = {
        "data": out / "data",
        "tokenizer": out / "tokenizer",
        "base_hf": out / "base_hf",
        "base_megatron": out / "base_megatron",
        "sft_data": out / "sft_data",
        "sft_eval": out / "sft_eval",
        "general_eval": out / "general_eval",
        "diagnostics": out / "diagnostics",
        "runs": out / "runs",
    }
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(WorkerPool(settings.tensor_parallel))
        elif pool.size < settings.tensor_parallel:
            raise DemoError(
                f"the pool has {pool.size} ranks; TP={settings.tensor_parallel} needs more"
            )
        build_base_model(settings, paths, timer, report, log)
        _convert_and_verify(settings, paths, timer, report, pool, log)
        _prepare_data(settings, paths, timer, report, pool, log)
        _diagnose_base(settings, paths, timer, report, pool, log)
        kinds = ["eaft", "sft"] if settings.compare_sft else ["eaft"]
        _evaluate_base(settings, paths, timer, report, pool, log)
        for kind in kinds:
            _finetune(settings, paths, kind, timer, report, pool, log)
    _export(paths, kinds, timer, report, log)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    _evaluate(settings, paths, kinds, timer, report, log)
    _benchmark(settings, paths, kinds, timer, report, log)
    _plot_runs(paths, kinds, timer, report, log)
    report["stage_seconds"] = timer.seconds
    report["stage_cpu_seconds"] = timer.cpu
    report["total_seconds"] = time.perf_counter() - started
    report["total_cpu_seconds"] = cpu_seconds() - cpu_started
    from megatron_eaft.demo.summary import format_report

    text = format_report(report)
    log("\n" + text)
    from megatron_eaft.diagnostics.report import write_json

    write_json(out / REPORT_JSON, report)
    (out / REPORT_TEXT).write_text(text + "\n", encoding="utf-8")
    log(f"\nwrote {out / REPORT_TEXT} and {out / REPORT_JSON}")
    return report


# --- stages ------------------------------------------------------------------------------------


def build_base_model(settings, paths, timer, report, log) -> None:
    """Data, tokenizer and the plain-torch pre-trained base (``paths["base_hf"]``).

    ``settings``: anything with the :class:`DemoSettings` fields general_documents,
    vocab_size, shape, pretrain and held_out (the forgetting experiment's settings have them).
    """
    from megatron_eaft.demo.data import chatml, read_general, write_demo_data
    from megatron_eaft.demo.pretrain import pretrain
    from megatron_eaft.demo.tokenizer import train_tokenizer

    with timer.stage("data"):
        files = write_demo_data(
            paths["data"], general_count=settings.general_documents, held_out=settings.held_out
        )
        for path in files.values():
            log(f"   {path.name}: {path.stat().st_size / 1024:.0f} KiB")
        report["data_files"] = {name: str(path) for name, path in files.items()}
    general = read_general(files["general"])
    domain = [json.loads(line) for line in files["domain_train"].read_text().splitlines()]
    with timer.stage("tokenizer"):
        tokenizer = train_tokenizer(
            general + [chatml(chat["messages"]) for chat in domain],
            settings.vocab_size,
            paths["tokenizer"],
        )
        log(f"   byte-level BPE, {len(tokenizer)} tokens, ChatML template")
    with timer.stage("pre-train (plain torch)"):
        result = pretrain(
            general, tokenizer, settings.shape, settings.pretrain, paths["base_hf"], log=log
        )
        report["model"] = {
            "architecture": "Qwen3ForCausalLM",
            "parameters": result["parameters"],
            "vocab_size": len(tokenizer),
            **dataclasses.asdict(settings.shape),
        }
        report["pretrain"] = {
            "corpus_tokens": result["tokens"],
            "steps": settings.pretrain.steps,
            "first_loss": result["losses"][0],
            "final_loss": sum(result["losses"][-5:]) / len(result["losses"][-5:]),
        }
        log(f"   {result['parameters']:,} parameters, {result['tokens']:,} corpus tokens")


def _convert_and_verify(settings, paths, timer, report, pool, log) -> None:
    from megatron_eaft.convert.engine import import_hf_checkpoint
    from megatron_eaft.convert.verify import DEFAULT_ATOL, DEFAULT_MIN_TOP1, verify_checkpoint

    tp = settings.tensor_parallel
    with timer.stage(
        "convert import",
        f"megatron-eaft convert import --hf {paths['base_hf']} --out {paths['base_megatron']}",
    ):
        summary = import_hf_checkpoint(
            paths["base_hf"], paths["base_megatron"], dtype="fp32", progress=False
        )
        log(f"   {summary.line()}")
    with timer.stage(
        "convert verify",
        f"megatron-eaft convert verify --hf {paths['base_hf']} --megatron "
        f"{paths['base_megatron']} --tp {tp}",
    ):
        result = verify_checkpoint(
            paths["base_hf"], paths["base_megatron"], tp=tp, seq_len=32, runner=pool.run
        )
        ok = result.ok(DEFAULT_ATOL, DEFAULT_MIN_TOP1)
        log(f"   TP{tp}: {result.line()} -> {'OK' if ok else 'FAILED'}")
        report["conversion"] = {
            "tp": tp,
            "max_abs_diff": result.max_abs_diff,
            "mean_abs_diff": result.mean_abs_diff,
            "top1_agreement": result.top1_agreement,
            "positions": result.positions,
            "ok": ok,
        }
    if not ok:
        raise DemoError(
            f"the converted checkpoint does not reproduce the HF logits: {result.line()}"
        )


def _prepare_data(settings, paths, timer, report, pool, log) -> None:
    from megatron_eaft.data.prepare import PrepareConfig

    report["sft_data"] = {}
    for split, target in (("train", paths["sft_data"]), ("eval", paths["sft_eval"])):
        source = paths["data"] / f"domain_{split}.jsonl"
        with timer.stage(
            f"prepare-data ({split})",
            f"megatron-eaft prepare-data --input {source} --tokenizer {paths['base_hf']} "
            f"--output {target} --seq-length {settings.seq_length}",
        ):
            config = PrepareConfig(
                inputs=[source],
                tokenizer=paths["base_hf"],
                output=target,
                seq_length=settings.seq_length,
                progress=False,
            )
            summary = pool.run(_prepare_in_worker, 1, config)[0]
            for line in summary.format(config).splitlines():
                log(f"   {line}")
            report["sft_data"][split] = summary.as_dict()
    from megatron_eaft.demo.data import read_general

    source = paths["data"] / "general_eval.jsonl"
    documents = read_general(paths["data"] / "general.jsonl")[: settings.general_eval_documents]
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), "utf-8")
    with timer.stage(
        "prepare-data (general text)",
        f"megatron-eaft prepare-data --input {source} --format text --tokenizer "
        f"{paths['base_hf']} --output {paths['general_eval']} --seq-length {settings.seq_length}",
    ):
        config = PrepareConfig(
            inputs=[source],
            tokenizer=paths["base_hf"],
            output=paths["general_eval"],
            seq_length=settings.seq_length,
            input_format="text",
            progress=False,
        )
        summary = pool.run(_prepare_in_worker, 1, config)[0]
        log(f"   {summary.format(config).splitlines()[0]}")
        report["sft_data"]["general_text"] = summary.as_dict()


def _eval_set_losses(evaluation: dict[str, dict[str, float]]) -> dict[str, float]:
    """lm loss per eval set: data.eval_path as "domain", eval.sets.general as "general"."""
    return {"domain": evaluation[""]["lm loss"], "general": evaluation["general"]["lm loss"]}


def _evaluate_base(settings, paths, timer, report, pool, log) -> None:
    run_dir = paths["runs"] / "base_eval"
    config = finetune_config(settings, run_dir, "sft", paths)
    config["checkpoint"] = {"save": None}
    config_path = run_dir / "config.yaml"
    _write_yaml(config_path, config)
    with timer.stage("base model on the eval sets (no training)"):
        result = next(
            r
            for r in pool.run(evaluate_rank, settings.tensor_parallel, str(config_path))
            if r is not None
        )
    report["base_eval_sets"] = _eval_set_losses(result)


def _diagnose_base(settings, paths, timer, report, pool, log) -> None:
    from megatron_eaft.diagnostics.model_pass import PassOptions, run_pass
    from megatron_eaft.diagnostics.report import format_diagnosis, write_diagnosis
    from megatron_eaft.ops import EAFTConfig

    out = paths["diagnostics"] / "base_on_sft_data"
    with timer.stage(
        "diagnose base model on the SFT data",
        f"megatron-eaft diagnose model --megatron {paths['base_megatron']} --data "
        f"{paths['sft_data']} --tp {settings.tensor_parallel} --max-tokens "
        f"{settings.diagnose_tokens} --out {out}",
    ):
        result = run_pass(
            paths["base_megatron"],
            paths["sft_data"],
            tp=settings.tensor_parallel,
            options=PassOptions(
                eaft=EAFTConfig(check_finite=True), max_tokens=settings.diagnose_tokens
            ),
            runner=pool.run,
        )
        for line in format_diagnosis(result).splitlines():
            log(f"   {line}")
        write_diagnosis(result, out)
        stats, agreement = result["statistics"], result["topk_vs_exact"]
        report["diagnostics"] = {
            "dir": str(out),
            "tokens": stats["tokens"],
            "mean_entropy": stats["mean_entropy"],
            "confident_conflict_frac": stats["confident_conflict_frac"],
            "mean_weight": stats["mean_weight"],
            "topk_vs_exact_pearson_r": agreement["pearson_r"],
            "topk_vs_exact_mean_abs_error": agreement["mean_abs_error"],
        }


def _finetune(settings, paths, kind, timer, report, pool, log) -> None:
    run_dir = paths["runs"] / kind
    config_path = run_dir / "config.yaml"
    _write_yaml(config_path, finetune_config(settings, run_dir, kind, paths))
    tp = settings.tensor_parallel
    with timer.stage(
        f"finetune ({kind}, TP={tp}, gloo)",
        f"torchrun --nproc-per-node {tp} -m megatron_eaft.cli.main finetune --config {config_path}",
    ):
        result = next(r for r in pool.run(finetune_rank, tp, str(config_path)) if r is not None)
    records = result["records"]
    if len(records) != settings.iterations:
        raise DemoError(f"{kind} run stopped after {len(records)} of {settings.iterations} steps")
    report.setdefault("runs", {})[kind] = {
        "dir": str(run_dir),
        "iterations": len(records),
        "first": records[0]["loss"],
        "last": records[-1]["loss"],
        "eval_lm_loss": {str(k): v for k, v in result["eval_losses"].items()},
        "eval_sets": {str(k): _eval_set_losses(v) for k, v in result["evaluations"].items()},
        "ms_per_iteration": sum(r["ms_per_iteration"] for r in records) / len(records),
    }


def _export(paths, kinds, timer, report, log) -> None:
    from megatron_eaft.convert.engine import export_megatron_checkpoint
    from megatron_eaft.demo.evaluate import load_model

    tokenizer = None
    for kind in kinds:
        source = paths["runs"] / kind / "checkpoints"
        target = paths["runs"] / kind / "hf"
        with timer.stage(
            f"convert export ({kind})",
            f"megatron-eaft convert export --megatron {source} --out {target}",
        ):
            summary = export_megatron_checkpoint(source, target, progress=False)
            log(f"   {summary.line()}")
            if not (target / "tokenizer.json").is_file():
                # The trainer's checkpoint root keeps no tokenizer: give the HF dir the base one.
                if tokenizer is None:
                    tokenizer = load_model(paths["base_hf"])[1]
                tokenizer.save_pretrained(str(target))
        paths[f"{kind}_hf"] = target


def _evaluate(settings, paths, kinds, timer, report, log) -> None:
    from megatron_eaft.demo.data import domain_qa, general_questions, read_general
    from megatron_eaft.demo.evaluate import (
        accuracy,
        answer_loss,
        generate_answers,
        load_model,
        mean_token_loss,
    )

    general_qa = general_questions()[: settings.general_eval_questions]
    domain = domain_qa("eval")
    step = max(1, len(domain) // settings.domain_eval_questions)
    domain_eval = domain[::step][: settings.domain_eval_questions]
    # As many questions from the SFT set itself: memorising it and generalising from it differ.
    seen = domain_qa("train")
    seen_eval = seen[:: max(1, len(seen) // settings.domain_eval_questions)][
        : settings.domain_eval_questions
    ]
    general_docs = read_general(paths["data"] / "general.jsonl")[:200]
    sample_questions = [domain_eval[0].question, general_qa[0].question]
    results: dict[str, Any] = {}
    with timer.stage("evaluate with transformers (generate)"):
        for label in ["base", *kinds]:
            model, tokenizer = load_model(paths[f"{label}_hf"])
            domain_accuracy, _ = accuracy(model, tokenizer, domain_eval)
            seen_accuracy, _ = accuracy(model, tokenizer, seen_eval)
            general_accuracy, _ = accuracy(model, tokenizer, general_qa)
            results[label] = {
                "domain_accuracy": domain_accuracy,
                "seen_domain_accuracy": seen_accuracy,
                "domain_loss": answer_loss(model, tokenizer, domain_eval),
                "general_accuracy": general_accuracy,
                "general_loss": mean_token_loss(model, tokenizer, general_docs),
                "samples": dict(
                    zip(
                        sample_questions,
                        generate_answers(model, tokenizer, sample_questions),
                        strict=True,
                    )
                ),
            }
            log(
                f"   {label:>4}: held-out conversions {100 * domain_accuracy:5.1f}% exact, "
                f"seen {100 * seen_accuracy:5.1f}% "
                f"(answer loss {results[label]['domain_loss']:.3f}), general questions "
                f"{100 * general_accuracy:5.1f}%, general-text loss "
                f"{results[label]['general_loss']:.3f}"
            )
    report["evaluation"] = {
        "domain_questions": len(domain_eval),
        "general_questions": len(general_qa),
        "general_documents": len(general_docs),
        "models": results,
    }


def _benchmark(settings, paths, kinds, timer, report, log) -> None:
    """The paper's table for the demo's models: `megatron-eaft evaluate` on local lm_eval tasks
    (skipped, with a line saying so, without the `eval` extra)."""
    import importlib.util

    from megatron_eaft.demo.lm_eval_tasks import score_on_local_tasks, write_lm_eval_tasks

    if importlib.util.find_spec("lm_eval") is None:
        log('\n== megatron-eaft evaluate: skipped (pip install "megatron-eaft[eval]")')
        return
    tasks = write_lm_eval_tasks(
        paths["data"] / "lm_eval_tasks",
        settings.held_out,
        settings.domain_eval_questions,
        settings.general_eval_questions,
    )
    models = [f"base={paths['base_hf']}", *(f"{kind}={paths[f'{kind}_hf']}" for kind in kinds)]
    with timer.stage("megatron-eaft evaluate (lm_eval, local tasks)"):
        comparison, command = score_on_local_tasks(
            models, tasks, paths["diagnostics"] / "evaluate", 32, log
        )
    report["benchmarks"] = {
        "command": command,
        "table": comparison.format(),
        "results": comparison.as_dict(),
    }


def _plot_runs(paths, kinds, timer, report, log) -> None:
    from megatron_eaft.diagnostics.plots import CONFLICT_KEY, EVAL_KEY, LOSS_KEYS
    from megatron_eaft.diagnostics.report import format_curves, write_curves
    from megatron_eaft.diagnostics.run_logs import read_run_log

    out = paths["diagnostics"] / "runs"
    logs = " ".join(f"--log {k}={paths['runs'] / k / 'tensorboard'}" for k in kinds)
    with timer.stage("plot training curves", f"megatron-eaft diagnose run {logs} --out {out}"):
        runs = {kind: read_run_log(paths["runs"] / kind / "tensorboard") for kind in kinds}
        write_curves(runs, out)
        report["curves"] = format_curves(runs, (*LOSS_KEYS, EVAL_KEY, CONFLICT_KEY))
        report["curves_png"] = str(out / "training_curves.png")
    report["series"] = {
        kind: {key: runs[kind].get(key, []) for key in (*LOSS_KEYS, EVAL_KEY, CONFLICT_KEY)}
        for kind in kinds
    }
    if any(
        not math.isfinite(v) for s in report["series"].values() for p in s.values() for _, v in p
    ):
        raise DemoError("a training curve holds a non-finite value")
