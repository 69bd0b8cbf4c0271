"""One forward-only pass of a Megatron checkpoint over an SFT dataset, collecting EAFT statistics.

Every rank builds its part of the model at the requested TP/PP (DP = the rest of the world),
loads the checkpoint (converted or fine-tuned) and runs Megatron's forward-only pipeline
schedule over its data-parallel share of the rows. On the last pipeline stage each
micro-batch's vocab-parallel logits go through the production loss op three ways:

* the configured EAFT statistics (entropy, target probability, CE) -> :class:`TokenHistogram`;
* the exact entropy (one extra all-reduce per token) and the global top-K entropy ->
  :class:`EntropyAgreement`.

The sums are all-reduced over data parallel and handed back by one rank (last stage, TP rank 0,
DP rank 0); every other rank returns None.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_eaft.diagnostics.statistics import EntropyAgreement, TokenHistogram
from megatron_eaft.ops import EAFTConfig, vocab_parallel_weighted_cross_entropy
from megatron_eaft.ops.vocab_parallel import global_topk_values, topk_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """What to collect. ``max_tokens`` counts loss-masked tokens over all data-parallel ranks."""

    eaft: EAFTConfig = dataclasses.field(default_factory=EAFTConfig)
    max_tokens: int | None = None
    entropy_bins: int = 50
    prob_bins: int = 50
    agreement_bins: int = 20
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        # Histograms need the entropy whatever the kind.
        object.__setattr__(self, "eaft", dataclasses.replace(self.eaft, diagnostics=True))


def token_statistics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    config: EAFTConfig,
    tp_group: Any,
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(configured TokenLoss, top-K entropy in nats, exact entropy in nats) per position.

    ``logits`` is the vocab shard ``[..., V/TP]``; it is consumed (fp32 logits become the
    softmax in place, as in training).
    """
    partition = logits.size(-1)
    world = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    vocab = partition * world
    topk_nats = topk_entropy(
        global_topk_values(logits.reshape(-1, partition), config.topk, tp_group)
    )
    exact_config = dataclasses.replace(
        config, kind="sft", entropy="exact", norm="lnv", diagnostics=True
    )
    # fp32 input is overwritten by the op: the first of two calls gets a copy.
    exact_input = logits.clone() if logits.dtype == torch.float32 else logits
    exact = vocab_parallel_weighted_cross_entropy(
        exact_input, labels, exact_config, tp_group, loss_mask
    )
    del exact_input
    exact_nats = exact.entropy.reshape(-1) * math.log(vocab)
    configured = vocab_parallel_weighted_cross_entropy(logits, labels, config, tp_group, loss_mask)
    return configured, topk_nats, exact_nats


def select_rows(loss_tokens: list[int], max_tokens: int | None) -> list[int]:
    """Rows in dataset order until ``max_tokens`` loss-masked tokens are covered (all if None)."""
    rows, covered = [], 0
    for row, count in enumerate(loss_tokens):
        if max_tokens is not None and covered >= max_tokens:
            break
        rows.append(row)
        covered += count
    return rows


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_inputs(
    megatron_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    tp: int,
    pp: int,
    *,
    allow_tokenizer_mismatch: bool = False,
) -> None:
    """What can be refused from metadata alone, before ranks start: the checkpoint (its
    description and tracker), the layout for this model, the dataset's tokenizer."""
    from megatron_eaft.data.compatibility import check_dataset_for_model
    from megatron_eaft.models import ModelMetadata, ParallelLayout, check_layout
    from megatron_eaft.models.checkpoint_dir import checkpoint_dir

    metadata = ModelMetadata.read(megatron_dir)
    checkpoint_dir(megatron_dir)
    check_layout(metadata, ParallelLayout(tensor=tp, pipeline=pp))
    if not allow_tokenizer_mismatch:
        check_dataset_for_model(
            data_dir,
            metadata,
            megatron_dir,
            override_hint="--allow-tokenizer-mismatch accepts it",
        )


def build_model(megatron_dir: str, tp: int, pp: int, dtype: torch.dtype):
    """The GPTModel stage of this rank, with the checkpoint's weights (converted or trained)."""
    from megatron_eaft.models import ModelMetadata, ParallelLayout, load_model_weights
    from megatron_eaft.models import build_model as build_layout_model

    metadata = ModelMetadata.read(megatron_dir)
    model = build_layout_model(metadata, ParallelLayout(tensor=tp, pipeline=pp), dtype=dtype)
    load_model_weights(model, megatron_dir)
    model.eval()
    return model


def collect_statistics(
    megatron_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    options: PassOptions | None = None,
) -> dict[str, Any] | None:
    """Rank function (world size = TP * PP * DP): the pass described in the module docstring.

    Runs on an initialised process group; returns the statistics on the reporting rank.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_eaft.data.sft_dataset import SFTDataset, collate_sft_rows
    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.megatron.loss import model_inputs

    options = options or PassOptions()
    cpu_runtime.initialize_parallel(tp=tp, pp=pp)
    device = _device()
    model = build_model(str(megatron_dir), tp, pp, DTYPES[options.dtype])
    dataset = SFTDataset(data_dir)
    loss_tokens = [int(dataset[row]["loss_mask"].sum()) for row in range(len(dataset))]
    rows = select_rows(loss_tokens, options.max_tokens)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    my_rows = rows[dp_rank::dp_size]

    tp_group = ps.get_tensor_model_parallel_group()
    histogram = TokenHistogram(options.eaft, options.entropy_bins, options.prob_bins, device=device)
    # Agreement is measured on EAFT's weight scale, ln K, whatever the configured norm.
    agreement = EntropyAgreement(math.log(options.eaft.topk), options.agreement_bins, device=device)

    def batches():
        for row in my_rows:
            batch = collate_sft_rows([dataset[row]])
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        inputs = model_inputs(batch, model_chunk)
        inputs.pop("labels")
        logits = model_chunk(**inputs)

        def collect(output: torch.Tensor, non_loss_data: bool = True) -> None:
            configured, topk_nats, exact_nats = token_statistics(
                output, batch["labels"], batch["loss_mask"], options.eaft, tp_group
            )
            histogram.update(
                configured.entropy, configured.target_prob, configured.ce, batch["loss_mask"]
            )
            agreement.update(topk_nats, exact_nats, batch["loss_mask"])

        return logits, collect

    if my_rows:
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=batches(),
                model=[model],
                num_microbatches=len(my_rows),
                seq_length=dataset.seq_length,
                micro_batch_size=1,
                forward_only=True,
                collect_non_loss_data=True,
            )
    if not ps.is_pipeline_last_stage():
        return None
    dp_group = ps.get_data_parallel_group()
    histogram.all_reduce(dp_group)
    agreement.all_reduce(dp_group)
    if ps.get_tensor_model_parallel_rank() != 0 or dp_rank != 0:
        return None
    return {
        "checkpoint": str(Path(megatron_dir).absolute()),
        "data": str(Path(data_dir).absolute()),
        "layout": {"tp": tp, "pp": pp, "dp": dp_size},
        "rows": len(rows),
        "dataset_rows": len(dataset),
        "seq_length": dataset.seq_length,
        "eaft_config": options.eaft.to_dict(),
        "statistics": histogram.to_dict(),
        "topk_vs_exact": {"k": options.eaft.topk, **agreement.to_dict()},
    }


def run_pass(
    megatron_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    options: PassOptions | None = None,
    runner: Callable[..., list[Any]] | None = None,
) -> dict[str, Any]:
    """:func:`collect_statistics` on ``tp * pp * dp`` local gloo ranks; the reporting rank's result.

    ``runner(fn, world_size, *args)`` starts the ranks (default: fresh worker processes from
    the launcher; pass a :class:`~megatron_eaft.megatron.launcher.WorkerPool`'s ``run`` to
    reuse one). Under torchrun / srun call :func:`collect_statistics` on every rank instead.
    """
    for name, size in (("tp", tp), ("pp", pp), ("dp", dp)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    if runner is None:
        from megatron_eaft.megatron.launcher import run_distributed as runner
    results = runner(
        collect_statistics,
        tp * pp * dp,
        str(Path(megatron_dir).absolute()),
        str(Path(data_dir).absolute()),
        tp,
        pp,
        options or PassOptions(),
    )
    reported = [result for result in results if result is not None]
    if len(reported) != 1:
        raise RuntimeError(f"expected one reporting rank, got {len(reported)}")
    return reported[0]
