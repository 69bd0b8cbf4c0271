"""Does a converted checkpoint compute what the HF model computes? Compare logits on CPU.

transformers runs the HF directory in fp32; Megatron-Core builds the model from the
converted directory alone (its metadata, or Bridge's run config, + ``build_model``) at the requested
TP/PP/EP on gloo ranks, loads the checkpoint with ``dist_checkpointing`` (so resharding is
exercised too) and runs a forward-only pipeline schedule. Logits are compared over the real
vocab (padding rows cut off).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_ATOL = 1e-2
DEFAULT_MIN_TOP1 = 0.99


@dataclass(frozen=True)
class LogitComparison:
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    positions: int

    def ok(self, atol: float, min_top1: float) -> bool:
        return (
            math.isfinite(self.max_abs_diff)
            and self.max_abs_diff <= atol
            and self.top1_agreement >= min_top1
        )

    def line(self) -> str:
        return (
            f"max |diff| {self.max_abs_diff:.3e}, mean |diff| {self.mean_abs_diff:.3e}, "
            f"top-1 agreement {self.top1_agreement:.4f} over {self.positions} positions"
        )


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> LogitComparison:
    if reference.shape != candidate.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}"
        )
    diff = (reference.double() - candidate.double()).abs()
    agree = (reference.argmax(-1) == candidate.argmax(-1)).double()
    return LogitComparison(
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        top1_agreement=float(agree.mean()),
        positions=agree.numel(),
    )


def sample_inputs(
    vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator)


def hf_logits(hf_dir: str | os.PathLike, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the HF checkpoint (transformers, CPU), for text-only input.

    The model class is the one ``config.json`` names, so a vision-language checkpoint
    (``Qwen3_5ForConditionalGeneration``) runs whole, with the text positions transformers
    gives text-only input, and is compared on its language model's logits.
    """
    import transformers

    from megatron_eaft.models.metadata import read_json_object

    architectures = read_json_object(Path(hf_dir) / "config.json").get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    model = model_class.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _logits_loss_func(output: torch.Tensor, non_loss_data: bool = False):
    # Forward-only schedule with collect_non_loss_data: whatever this returns is collected.
    return output


def megatron_logits(
    megatron_dir: str,
    input_ids: torch.Tensor,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    iteration: int | str | None = None,
) -> torch.Tensor | None:
    """Rank function: fp32 logits of the converted checkpoint at TP/PP/EP (rank 0 returns them).

    Runs on ranks of an initialised gloo/NCCL process group of ``tp * pp * ep`` ranks (or
    any multiple: extra ranks are data parallel and see the same inputs).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_eaft.megatron import cpu_runtime
    from megatron_eaft.models import ParallelLayout, build_model, load_model_weights
    from megatron_eaft.models.bridge_config import read_model_metadata

    cpu_runtime.initialize_parallel(tp=tp, pp=pp, ep=ep)
    metadata = read_model_metadata(megatron_dir, iteration)
    # fp32 and the local spec: the comparison runs on CPU against transformers in fp32.
    model = build_model(
        metadata,
        ParallelLayout(tensor=tp, pipeline=pp, expert=ep),
        dtype=torch.float32,
        transformer_impl="local",
    )
    load_model_weights(model, megatron_dir, iteration=iteration)
    model.eval()
    batch, seq_len = input_ids.shape
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(batch, -1)

    def forward_step(data_iterator, model_chunk):
        tokens = next(data_iterator)
        return model_chunk(tokens, position_ids, None), _logits_loss_func

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([input_ids]),
            model=[model],
            num_microbatches=1,
            seq_length=seq_len,
            micro_batch_size=batch,
            forward_only=True,
            collect_non_loss_data=True,
        )
    vocab = metadata.vocab_size
    logits = None
    if parallel_state.is_pipeline_last_stage():
        logits = gather_from_tensor_model_parallel_region(outputs[0])[..., :vocab].float()
    # Hand the last stage's logits to global rank 0 (same TP / DP coordinates, first stage).
    is_sender = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
        and torch.distributed.get_rank() != 0
    )
    if is_sender:
        torch.distributed.send(logits.contiguous(), dst=0)
    elif torch.distributed.get_rank() == 0 and logits is None:
        logits = torch.empty(batch, seq_len, vocab)
        torch.distributed.recv(logits, src=parallel_state.get_pipeline_model_parallel_last_rank())
    return logits if torch.distributed.get_rank() == 0 else None


def verify_checkpoint(
    hf_dir: str | os.PathLike,
    megatron_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    runner: Callable[..., list[Any]] | None = None,
) -> LogitComparison:
    """Logits of the HF directory vs. the converted checkpoint at TP/PP/EP.

    The Megatron side runs on ``tp * pp * ep`` gloo ranks started by ``runner`` (default:
    fresh worker processes from the launcher; tests pass their shared pool's ``run``), so
    this process never initialises Megatron or patches torch for CPU.
    """
    from megatron_eaft.models import ParallelLayout, check_layout
    from megatron_eaft.models.bridge_config import read_model_metadata
    from megatron_eaft.models.checkpoint_dir import checkpoint_dir

    metadata = read_model_metadata(megatron_dir)
    checkpoint_dir(megatron_dir)
    check_layout(metadata, ParallelLayout(tensor=tp, pipeline=pp, expert=ep))
    input_ids = sample_inputs(metadata.vocab_size, batch, seq_len, seed)
    reference = hf_logits(hf_dir, input_ids)
    megatron_dir = str(Path(megatron_dir).absolute())
    if runner is None:
        from megatron_eaft.megatron.launcher import run_distributed as runner
    results = runner(megatron_logits, tp * pp * ep, megatron_dir, input_ids, tp, pp, ep)
    return compare_logits(reference, results[0])
