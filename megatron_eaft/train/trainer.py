"""The fine-tuning loop on Megatron-Core: parallel state, model, DDP, optimizer, schedule, saves.

One optimizer step (:meth:`Trainer.train_step`):

1. every rank reads its data-parallel slice of the global batch (:mod:`.batches`) as
   ``num_microbatches`` micro-batches;
2. ``get_forward_backward_func()`` runs them through the pipeline schedule with the EAFT
   forward step (report keys ``lm loss``, ``eaft loss``, ``eaft/...`` as [sum, count]); with
   ``calculate_per_token_loss`` the gradient is the token mean over the whole global batch;
3. Megatron DDP reduces gradients, the Megatron optimizer clips them and steps, the
   scheduler sets the next learning rate;
4. the report sums are added over micro-batches and all-reduced over data parallel (+ context
   parallel), so the last pipeline stage holds the global-batch values.

:meth:`Trainer.fit` adds logging, evaluation, periodic checkpoints, resume and stopping on
SIGTERM / SIGINT (checkpoint at the step boundary).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_eaft.log import ALL_RANKS
from megatron_eaft.log import configure as configure_logging
from megatron_eaft.megatron import cpu_runtime
from megatron_eaft.megatron.loss import EAFTForwardStep, install_eaft_loss
from megatron_eaft.train import batches as batching
from megatron_eaft.train import checkpointing
from megatron_eaft.train.config import ConfigError, FinetuneConfig
from megatron_eaft.train.model import (
    build_model,
    description_for_save,
    model_description,
    resolve_transformer_impl,
)

_log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """What one optimizer step did, as the last pipeline stage saw it."""

    iteration: int  # 1-based: the number of optimizer steps done after this one
    reports: dict[str, tuple[float, float]]  # key -> (sum, count) over the global batch
    grad_norm: float
    learning_rate: float
    update_successful: bool
    seconds: float
    tokens: int  # positions processed (global batch * sequence length)

    def value(self, key: str) -> float:
        total, count = self.reports[key]
        return total / count if count else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "learning_rate": self.learning_rate,
            "grad_norm": self.grad_norm,
            "update_successful": self.update_successful,
            "ms_per_iteration": 1000.0 * self.seconds,
            "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else None,
            "loss": {key: self.value(key) for key in self.reports},
            "sums": {key: list(value) for key, value in self.reports.items()},
        }


@dataclass
class FitResult:
    records: list[StepRecord] = field(default_factory=list)
    start_iteration: int = 0
    final_iteration: int = 0
    stopped_by_signal: bool = False
    # iteration -> lm loss of data.eval_path (or, without it, of the first of eval.sets)
    eval_losses: dict[int, float] = field(default_factory=dict)
    # iteration -> set name ("" for data.eval_path) -> report key -> value
    evaluations: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) ask the fit loop to stop at the end of the current step.

    The loop then saves a checkpoint and returns normally (exit 0). A second SIGINT aborts at
    once: SIGINT is back at its default action after the first, which stops the process even
    inside a collective that never returns. Repeated SIGTERMs are one request (srun and torchrun
    may both deliver it). Handlers are installed only in the main thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self._previous: dict[int, Any] = {}

    @property
    def reason(self) -> str:
        """What the stop message names (another rank may have received the signal)."""
        return self.received or "a signal on another rank"

    def _handler(self, signum: int, frame: Any) -> None:
        first = self.received is None
        if first:
            self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if first and _announces():
            # os.write, not print: a handler may interrupt a print in progress.
            again = "; Ctrl-C again to abort" if signum == signal.SIGINT else ""
            os.write(
                2,
                f"{self.received}: saving at the end of this step, then exiting{again}\n".encode(),
            )

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def _announces() -> bool:
    """Whether this process prints what every rank does (the last rank, as the loop does)."""
    if torch.distributed.is_initialized():
        return _is_last_rank()
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return not (rank.isdigit() and world.isdigit()) or int(rank) == int(world) - 1


# The scheduler's values set by the configuration (key named in errors), and those that follow
# from the run's length, which `Trainer._reconcile_schedule` lets change.
_SCHEDULE_KEYS = {
    "max_lr": "optimizer.lr",
    "min_lr": "optimizer.min_lr",
    "lr_decay_style": "optimizer.decay_style",
    "start_wd": "optimizer.weight_decay",
    "end_wd": "optimizer.weight_decay",
}
_SCHEDULE_LENGTHS = ("lr_warmup_steps", "lr_decay_steps", "wd_incr_steps")


def _is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _device() -> torch.device:
    if cpu_runtime.cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    """Builds everything on an initialised ``torch.distributed`` and runs steps.

    The model's loss is the token-weighted one of ``config.eaft`` (``kind: sft`` with
    ``diagnostics: false`` leaves Megatron's own cross-entropy untouched); in evaluation the
    forward step optimises and reports plain cross-entropy.
    """

    def __init__(self, config: FinetuneConfig):
        if not torch.distributed.is_initialized():
            raise RuntimeError("Trainer needs torch.distributed to be initialised first")
        self.config = config
        parallel = config.parallel
        world_size = torch.distributed.get_world_size()
        self.data_parallel_size = parallel.data_parallel_size(world_size)
        self.num_microbatches = config.data.num_microbatches(self.data_parallel_size)
        cpu_runtime.initialize_parallel(
            tp=parallel.tensor,
            pp=parallel.pipeline,
            cp=parallel.context,
            ep=parallel.expert,
            seed=config.train.seed,
        )
        self.device = _device()
        self.description = model_description(config)
        self.transformer_impl = resolve_transformer_impl(config.model.transformer_impl)
        if parallel.context > 1 and self.transformer_impl != "transformer_engine":
            raise ConfigError(
                "parallel.context",
                "context parallelism needs Transformer Engine attention "
                "(model.transformer_impl: transformer_engine); Megatron's local attention has none",
            )
        self.resume_from = self._resume_root()
        self.model = build_model(
            config,
            self.description,
            transformer_impl=self.transformer_impl,
            # Weights that are about to be overwritten need no initialisation.
            initialize_weights=config.model.checkpoint is None and self.resume_from is None,
        )
        if config.model.checkpoint is not None and self.resume_from is None:
            checkpointing.load_model_weights(self.model, config.model.checkpoint)
        try:
            config.eaft.validate_vocab(self.model.vocab_size)
        except ValueError as error:
            raise ConfigError("eaft.topk", str(error)) from None
        self._eaft_handle = install_eaft_loss(self.model, config.eaft)
        self.forward_step = EAFTForwardStep(config.eaft)
        self.ddp_model = self._wrap_ddp()
        self.optimizer = self._build_optimizer()
        self.iteration = 0
        self.total_iterations: int | None = None
        self.scheduler: Any = None
        self.datasets: dict[str, Any] = {}

    # -- construction ---------------------------------------------------------------------

    def _resume_root(self) -> str | None:
        root = self.config.resume_dir()
        if root is None:
            return None
        if self.config.checkpoint.load is not None:
            if checkpointing.latest_iteration(root) is None:
                raise ConfigError(
                    "checkpoint.load", f"{root} has no latest_checkpointed_iteration.txt"
                )
            return root
        return root if checkpointing.latest_iteration(root) is not None else None

    def _wrap_ddp(self):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=self.config.parallel.distributed_optimizer,
            check_for_nan_in_grad=True,
        )
        ddp_model = DistributedDataParallel(self.model.config, ddp_config, self.model)
        transformer_config = self.model.config
        transformer_config.finalize_model_grads_func = finalize_model_grads
        transformer_config.no_sync_func = ddp_model.no_sync
        return ddp_model

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        opt = self.config.optimizer
        dtype = self.config.model.dtype
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=opt.lr,
                min_lr=opt.min_lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2,
                adam_eps=opt.adam_eps,
                clip_grad=opt.clip_grad,
                bf16=dtype == "bf16",
                fp16=dtype == "fp16",
                params_dtype=self.model.config.params_dtype,
                use_distributed_optimizer=self.config.parallel.distributed_optimizer,
            ),
            [self.ddp_model],
        )
        self.model.config.grad_scale_func = optimizer.scale_loss
        return optimizer

    def build_scheduler(self, total_iterations: int, *, recompute: bool = False) -> None:
        """Warm-up + decay over `total_iterations`. With `recompute`, a resumed checkpoint
        keeps only its step count and the schedule is this one (see `_reconcile_schedule`)."""
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        opt = self.config.optimizer
        warmup = min(opt.warmup_steps(total_iterations), max(total_iterations - 1, 0))
        self.total_iterations = total_iterations
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if warmup > 0 else opt.lr,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=max(total_iterations, 1),
            lr_decay_style=opt.decay_style,
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=max(total_iterations, 1),
            wd_incr_style="constant",
            # Resuming with a changed schedule is a configuration error, not a silent switch;
            # a changed run length is reconciled before loading (recompute).
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=recompute,
        )

    def _reconcile_schedule(self, saved: dict[str, Any]) -> bool:
        """Compare the checkpoint's LR schedule with this config's before loading it.

        A changed run length (train.iterations / train.epochs raised to extend a finished run,
        or a changed warm-up) recomputes the schedule for the new length: the run continues at
        the checkpoint's step on the schedule it would have had with that length from the
        start. Any other change is refused naming its key. Returns whether it recomputed.
        """
        current = self.scheduler.state_dict()
        for name, key in _SCHEDULE_KEYS.items():
            if saved.get(name) != current[name]:
                raise ConfigError(
                    key,
                    f"is {current[name]!r} but the run in {self.resume_from} was trained with "
                    f"{saved.get(name)!r}; set it back to resume that run, or start a new run "
                    f"(another checkpoint.save, with model.checkpoint={self.resume_from} for "
                    "its weights)",
                )
        if all(saved.get(name) == current[name] for name in _SCHEDULE_LENGTHS):
            return False
        self.build_scheduler(self.total_iterations, recompute=True)
        return True

    def resume(self) -> dict[str, Any] | None:
        """Load the latest checkpoint of the resume root, if there is one."""
        if self.resume_from is None:
            return None
        saved = checkpointing.saved_schedule(self.resume_from)
        recomputed = saved is not None and self._reconcile_schedule(saved)
        state = checkpointing.load_checkpoint(
            self.resume_from, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.iteration = state["iteration"]
        _log.info(
            f"resumed from {self.resume_from} at iteration {self.iteration}"
            + ("" if state["rng_restored"] else " (new layout: RNG state re-seeded)")
        )
        if recomputed:
            _log.info(
                f"LR schedule recomputed for the new run length: {saved['lr_decay_steps']} -> "
                f"{self.total_iterations} iterations, warm-up {saved['lr_warmup_steps']} -> "
                f"{self.scheduler.lr_warmup_steps}; the learning rate continues at "
                f"{self._learning_rate():.3E}"
            )
        return state

    # -- data -----------------------------------------------------------------------------

    def dataset(self, path: str) -> Any:
        if path not in self.datasets:
            from megatron_eaft.data.sft_dataset import SFTDataset

            self.datasets[path] = SFTDataset(path)
        return self.datasets[path]

    def batch_plan(self, dataset: Any, *, shuffle: bool) -> batching.BatchPlan:
        from megatron.core import parallel_state as ps

        return batching.BatchPlan(
            num_rows=len(dataset),
            global_batch_size=self.config.data.global_batch_size,
            micro_batch_size=self.config.data.micro_batch_size,
            data_parallel_rank=ps.get_data_parallel_rank(),
            data_parallel_size=self.data_parallel_size,
            seed=self.config.data.seed,
            shuffle=shuffle,
        )

    def check_dataset(self, dataset: Any, key: str) -> None:
        """Context parallelism splits each row in 2 * CP chunks; packed rows it cannot split."""
        context = self.config.parallel.context
        if context == 1:
            return
        if dataset.metadata.get("packing") != "pad":
            raise ConfigError(
                "parallel.context",
                f"context parallelism needs one sample per row; {key}={dataset.path} is packed "
                "(prepare it with --packing pad)",
            )
        if dataset.seq_length % (2 * context):
            raise ConfigError(
                "parallel.context",
                f"the sequence length {dataset.seq_length} of {key} is not a multiple of "
                f"2 * parallel.context = {2 * context}",
            )

    def step_microbatches(self, dataset: Any, plan: batching.BatchPlan, step: int) -> list[dict]:
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_batch_on_this_cp_rank

        packed = dataset.metadata.get("packing") != "pad"
        use_thd = self.transformer_impl == "transformer_engine"
        microbatches = []
        for batch in batching.microbatches(dataset, plan.microbatch_rows(step)):
            batch = batching.model_batch(
                batching.to_device(batch, self.device), packed=packed, use_thd=use_thd
            )
            if self.config.parallel.context > 1:  # this rank's zigzag chunks of each row
                batch = get_batch_on_this_cp_rank(
                    batch, is_hybrid_cp=False, cp_group=ps.get_context_parallel_group()
                )
            microbatches.append(batch)
        return microbatches

    # -- one step -------------------------------------------------------------------------

    def _reduce_reports(self, per_microbatch: list[dict[str, torch.Tensor]]) -> dict:
        """Sum [sum, count] reports over micro-batches and data (+ context) parallel ranks."""
        from megatron.core import parallel_state as ps

        if not per_microbatch:
            return {}
        totals: dict[str, torch.Tensor] = {}
        for report in per_microbatch:
            for key, value in report.items():
                value = value.detach().float().reshape(-1)
                if value.numel() not in (1, 2):
                    raise ValueError(f"report {key!r} must hold 1 or 2 values, got {value.numel()}")
                totals[key] = totals.get(key, 0) + value
        keys = sorted(totals)
        stacked = torch.stack(
            [torch.cat([totals[k], totals[k].new_ones(2 - totals[k].numel())]) for k in keys]
        )
        torch.distributed.all_reduce(
            stacked, group=ps.get_data_parallel_group(with_context_parallel=True)
        )
        return {
            key: (float(row[0]), float(row[1]))
            for key, row in zip(keys, stacked.tolist(), strict=True)
        }

    def _mtp_reports(self) -> dict[str, tuple[float, float]]:
        """Megatron's own MTP losses of the step (``mtp_1 loss``, ...: each head's per-token
        loss as ``eaft.mtp`` makes it, averaged over micro-batches and data-parallel ranks),
        taken from its tracker, which is then cleared for the next step."""
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        # The tracker is process-wide: another model's (zeroed) entries may be in it.
        tracker = MTPLossLoggingHelper.tracker
        if not getattr(self.model.config, "mtp_num_layers", None) or "loss_values" not in tracker:
            return {}
        MTPLossLoggingHelper.reduce_metrics_in_tracker()
        values = tracker["loss_values"].tolist()
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        count = float(self.num_microbatches)
        return {f"mtp_{layer} loss": (v, count) for layer, v in enumerate(values, start=1)}

    def train_step(self, microbatches: Iterable[dict[str, Any]], seq_length: int) -> StepRecord:
        """One optimizer step over this rank's micro-batches of a global batch."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        microbatches = list(microbatches)
        if len(microbatches) != self.num_microbatches:
            raise ValueError(
                f"expected {self.num_microbatches} micro-batches, got {len(microbatches)}"
            )
        started = time.perf_counter()
        learning_rate = self._learning_rate()
        self.ddp_model.train()
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=iter(microbatches),
            model=[self.ddp_model],
            num_microbatches=self.num_microbatches,
            forward_only=False,
            **self._schedule_shape(microbatches[0]),
        )
        update_successful, grad_norm, _ = self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step(increment=1)
        reduced = {**self._reduce_reports(reports), **self._mtp_reports()}
        seconds = time.perf_counter() - started
        self.iteration += 1
        return StepRecord(
            iteration=self.iteration,
            reports=reduced,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            learning_rate=learning_rate,
            update_successful=bool(update_successful),
            seconds=seconds,
            tokens=self.config.data.global_batch_size * seq_length,
        )

    def _schedule_shape(self, microbatch: dict[str, Any]) -> dict[str, int]:
        """Sequence length and micro-batch size of the activations pipeline stages exchange.

        Taken from the micro-batch as the model sees it: a THD micro-batch is one [1, b*s]
        sequence; the schedule divides the length by CP itself.
        """
        rows, length = microbatch["tokens"].shape
        return {
            "seq_length": length * self.config.parallel.context,
            "micro_batch_size": rows,
        }

    def _learning_rate(self) -> float:
        """The learning rate the next optimizer step uses."""
        for group in self.optimizer.param_groups:
            if group.get("default_config", True):
                lr = group["lr"]
                return float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        return float("nan")

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Every evaluation set (name "" for data.eval_path) -> its report key -> value."""
        return {name: self.evaluate_set(path) for name, path in self.config.eval_sets().items()}

    def evaluate_set(self, path: str) -> dict[str, float]:
        """Over eval.iterations global batches of one set: plain cross-entropy (``lm loss``,
        the optimised loss in evaluation), the EAFT-weighted loss and the EAFT statistics."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        dataset = self.dataset(path)
        plan = self.batch_plan(dataset, shuffle=False)
        steps = min(self.config.eval.iterations, math.ceil(len(dataset) / plan.global_batch_size))
        self.ddp_model.eval()
        totals: dict[str, list[float]] = {}
        try:
            with torch.no_grad():
                for step in range(steps):
                    microbatches = self.step_microbatches(dataset, plan, step)
                    reports = get_forward_backward_func()(
                        forward_step_func=self.forward_step,
                        data_iterator=iter(microbatches),
                        model=[self.ddp_model],
                        num_microbatches=self.num_microbatches,
                        forward_only=True,
                        **self._schedule_shape(microbatches[0]),
                    )
                    for key, (total, count) in self._reduce_reports(reports).items():
                        pair = totals.setdefault(key, [0.0, 0.0])
                        pair[0] += total
                        pair[1] += count
        finally:
            self.ddp_model.train()
        return {
            key: total / count if count else float("nan") for key, (total, count) in totals.items()
        }

    # -- checkpoints ----------------------------------------------------------------------

    def save(self) -> Path:
        config = self.config
        path = checkpointing.save_checkpoint(
            config.checkpoint.save,
            self.iteration,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state={
                "consumed_samples": self.iteration * config.data.global_batch_size,
                "config": config.to_dict(),
            },
            model_description=description_for_save(self.description, config).replace(
                transformer_impl=self.transformer_impl
            ),
            optimizer_sharding=config.checkpoint.optimizer_sharding,
        )
        _log.info(f"saved checkpoint {path}")
        return path

    def close(self) -> None:
        if self._eaft_handle is not None:
            self._eaft_handle.remove()
            self._eaft_handle = None

    # -- the loop -------------------------------------------------------------------------

    def fit(self, stop: StopSignals | None = None) -> FitResult:
        """Train to the configured end; a stop request (`stop`, by default SIGTERM and SIGINT
        while fitting) ends the run at the next step boundary with a checkpoint."""
        if stop is None:
            with StopSignals() as stop:
                return self.fit(stop)
        config = self.config
        if config.data.path is None:
            raise ConfigError("data.path", "is required to train (a prepare-data output)")
        dataset = self.dataset(config.data.path)
        self.check_dataset(dataset, "data.path")
        if config.eval.interval is not None:
            for name, path in config.eval_sets().items():
                self.check_dataset(
                    self.dataset(path), f"eval.sets.{name}" if name else "data.eval_path"
                )
        total = config.train.total_iterations(len(dataset), config.data.global_batch_size)
        self.build_scheduler(total)
        if config.checkpoint.save is not None and torch.distributed.get_rank() == 0:
            removed = checkpointing.remove_incomplete(config.checkpoint.save)
            for path in removed:
                _log.warning("removed incomplete checkpoint %s", path, extra=ALL_RANKS)
        saved_iteration = checkpointing.latest_iteration(self.resume_from)
        if isinstance(saved_iteration, int) and saved_iteration > total:
            key = "train.iterations" if config.train.iterations is not None else "train.epochs"
            raise ConfigError(
                key,
                f"gives {total} iterations but the checkpoint in {self.resume_from} is already "
                f"at iteration {saved_iteration}: raise it to continue that run",
            )
        self.resume()
        result = FitResult(start_iteration=self.iteration)
        plan = self.batch_plan(dataset, shuffle=config.data.shuffle)
        logger = MetricsLogger(config, total)
        _log.info(
            f"training {self.description.family} ({self.transformer_impl}) from iteration "
            f"{self.iteration} to {total}: TP {config.parallel.tensor} PP "
            f"{config.parallel.pipeline} CP {config.parallel.context} DP "
            f"{self.data_parallel_size}, {self.num_microbatches} micro-batches of "
            f"{config.data.micro_batch_size} x {dataset.seq_length}, loss {config.eaft.kind}"
        )
        last_saved = self.iteration if self.resume_from is not None else None
        try:
            if _any_rank(stop.received is not None):  # during start-up: nothing new to save
                _log.info(f"{stop.reason}: stopped before iteration {self.iteration + 1}")
                result.stopped_by_signal = True
            while self.iteration < total and not result.stopped_by_signal:
                microbatches = self.step_microbatches(dataset, plan, self.iteration)
                record = self.train_step(microbatches, dataset.seq_length)
                self._check_finite(record)
                result.records.append(record)
                logger.step(record)
                if self._eval_due():
                    result.evaluations[self.iteration] = evaluation = self.evaluate()
                    first = next(iter(evaluation.values()))
                    result.eval_losses[self.iteration] = first.get("lm loss", float("nan"))
                    logger.eval(self.iteration, evaluation)
                stopping = _any_rank(stop.received is not None)
                if config.checkpoint.save is not None and (
                    stopping or self._save_due() or self.iteration == total
                ):
                    self.save()
                    last_saved = self.iteration
                if stopping:
                    _log.info(
                        f"{stop.reason}: stopped after iteration {self.iteration}"
                        + (" (checkpoint saved)" if last_saved == self.iteration else "")
                    )
                    result.stopped_by_signal = True
            if (
                config.checkpoint.save is not None
                and last_saved != self.iteration
                and not result.stopped_by_signal
            ):
                self.save()
        finally:
            logger.close()
        result.final_iteration = self.iteration
        return result

    def _save_due(self) -> bool:
        interval = self.config.checkpoint.save_interval
        return interval is not None and self.iteration % interval == 0

    def _eval_due(self) -> bool:
        interval = self.config.eval.interval
        return interval is not None and self.iteration % interval == 0

    def _check_finite(self, record: StepRecord) -> None:
        for key, (total, count) in record.reports.items():
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"iteration {record.iteration}: report {key!r} is {total} (sum over "
                    f"{count:g}); stopping before a non-finite loss reaches a checkpoint"
                )


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class MetricsLogger:
    """Console line every logging.interval steps; TensorBoard and W&B scalars (the same keys)
    and a JSONL line per step.

    Only the last rank writes (it is on the last pipeline stage, where the loss lives).
    """

    def __init__(self, config: FinetuneConfig, total_iterations: int):
        self.config = config
        self.total = total_iterations
        self.active = _is_last_rank()
        self.interval: list[StepRecord] = []
        self.writer = None
        self.metrics = None
        self.wandb = None
        if not self.active:
            return
        if config.logging.wandb_project is not None:
            from megatron_eaft.train.wandb_writer import WandbWriter

            self.wandb = WandbWriter(config)
        if config.logging.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=config.logging.tensorboard_dir)
        if config.logging.metrics_file is not None:
            path = Path(config.logging.metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.metrics = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def step(self, record: StepRecord) -> None:
        if not self.active:
            return
        samples = record.iteration * self.config.data.global_batch_size
        scalars = {
            "learning-rate": record.learning_rate,
            "grad-norm": record.grad_norm,
            "iteration-time": record.seconds,
            "tokens-per-sec": record.tokens / record.seconds,
            **{key: record.value(key) for key in record.reports},
        }
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record.iteration)
            for key in record.reports:
                self.writer.add_scalar(f"{key} vs samples", record.value(key), samples)
        if self.wandb is not None:  # W&B plots any key against another: samples is a key
            self.wandb.log({**scalars, "consumed-samples": samples}, record.iteration)
        if self.metrics is not None:
            self.metrics.write(json.dumps(record.as_dict()) + "\n")
            self.metrics.flush()
        self.interval.append(record)
        if record.iteration % self.config.logging.interval == 0 or record.iteration == self.total:
            print(self.console_line(self.interval, samples), flush=True)
            self.interval = []

    def console_line(self, records: list[StepRecord], samples: int) -> str:
        last = records[-1]
        seconds = sum(r.seconds for r in records)
        tokens = sum(r.tokens for r in records)
        parts = [
            f"iteration {last.iteration:8d}/{self.total:8d}",
            f"consumed samples {samples:10d}",
            f"ms/iter {1000.0 * seconds / len(records):9.1f}",
            f"tokens/s {tokens / seconds:10.1f}",
            f"lr {last.learning_rate:.3E}",
        ]
        keys = sorted({key for r in records for key in r.reports}, key=_report_order)
        for key in keys:
            total = sum(r.reports[key][0] for r in records if key in r.reports)
            count = sum(r.reports[key][1] for r in records if key in r.reports)
            parts.append(f"{key} {total / count if count else float('nan'):.6E}")
        parts.append(f"grad norm {last.grad_norm:.4f}")
        skipped = sum(not r.update_successful for r in records)
        if skipped:
            parts.append(f"skipped {skipped}")
        return " | ".join(parts)

    def eval(self, iteration: int, evaluation: dict[str, dict[str, float]]) -> None:
        """One console line per set; ``eval/[NAME/]KEY`` scalars; one JSONL line of them all."""
        if not self.active:
            return
        flat: dict[str, float] = {}  # "[NAME/]KEY" -> value, as the JSONL "eval" object holds
        for name, values in evaluation.items():
            prefix = f"{name}/" if name else ""
            parts = []
            for key in sorted(values, key=_report_order):
                flat[prefix + key] = values[key]
                parts.append(f"{key} {values[key]:.6E}")
                if key == "lm loss":
                    parts.append(f"lm loss PPL {_perplexity(values[key]):.6E}")
            where = f" [{name}]" if name else ""
            print(f"eval at iteration {iteration}{where}: " + " | ".join(parts), flush=True)
        scalars = {}
        for key, value in flat.items():
            scalars[f"eval/{key}"] = value
            if key.endswith("lm loss"):
                scalars[f"eval/{key} ppl"] = _perplexity(value)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, iteration)
        if self.wandb is not None:
            self.wandb.log(scalars, iteration)
        if self.metrics is not None:
            self.metrics.write(json.dumps({"iteration": iteration, "eval": flat}) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.wandb is not None:
            self.wandb.close()


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 20.0))  # capped: an untrained model's PPL would overflow


def _report_order(key: str) -> tuple[int, str]:
    return (0 if key == "lm loss" else 1, key)


def run_training(config: FinetuneConfig, stop: StopSignals | None = None) -> FitResult:
    """Build a Trainer on the initialised process group, fit, release the loss hook."""
    configure_logging()
    trainer = Trainer(config)
    try:
        return trainer.fit(stop)
    finally:
        trainer.close()


def main_worker(config: FinetuneConfig) -> int:
    """Entry of one launched process (torchrun / srun / local launcher: env:// rendezvous).

    SIGTERM / SIGINT are caught from here on, so one arriving during the model build or the
    checkpoint load stops the run cleanly too (exit 0).
    """
    from megatron_eaft.launch import setup_launch_env

    setup_launch_env()
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with StopSignals() as stop:
        cpu_runtime.init_process_group_from_env()
        try:
            run_training(config, stop)
        finally:
            cpu_runtime.destroy_parallel()
            torch.distributed.destroy_process_group()
    return 0
