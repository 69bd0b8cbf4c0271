"""torch_dist training checkpoints: save atomically, resume exactly, load weights at any layout.

A save root holds Megatron-LM's layout::

    <root>/iter_0000100/                       model + optimizer + LR schedule + iteration +
                                               data position + RNG (torch_dist)
    <root>/latest_checkpointed_iteration.txt   "100": the last COMPLETE checkpoint
    <root>/megatron_eaft_model.json            the model description (loads / exports like a
                                               converted checkpoint)

Every rank writes into ``<root>/.iter_0000100.incomplete``; only after all ranks finished does
rank 0 rename it and then replace the tracker file (write + fsync + rename). A run killed at any
moment (SIGKILL mid-save included) therefore leaves the tracker naming the previous complete
checkpoint, and the next run removes the leftover ``.incomplete`` directory. A full disk is
raised on every rank as one :class:`megatron_eaft.outputs.DiskFullError` naming the checkpoint
and the free space.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_eaft.models.bridge_config import write_bridge_run_config
from megatron_eaft.models.build import load_model_state, load_model_weights
from megatron_eaft.models.checkpoint_dir import (
    TRAINING_STATE_KEY,
    MegatronCheckpointError,
    checkpoint_dir,
    incomplete_dir,
    iteration_dir_name,
    publish_iteration,
    read_tracker,
    remove_incomplete,
)
from megatron_eaft.models.metadata import MODEL_METADATA_FILE, ModelMetadata
from megatron_eaft.outputs import disk_full_as_error

# The trainer's own state in a checkpoint's common state; converted checkpoints lack it.
TRAINER_STATE_KEY = TRAINING_STATE_KEY
TRAINER_STATE_VERSION = 1

__all__ = ["load_model_weights", "remove_incomplete"]


def latest_iteration(root: str | os.PathLike | None) -> int | str | None:
    """The tracker's iteration (an int, or "release"), or None when there is no checkpoint."""
    return read_tracker(root)


# --- RNG -------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "world_size": torch.distributed.get_world_size(),
        "tensor": ps.get_tensor_model_parallel_world_size(),
        "pipeline": ps.get_pipeline_model_parallel_world_size(),
        "context": ps.get_context_parallel_world_size(),
        "data": ps.get_data_parallel_world_size(),
    }


def _sharded_rng_state(state: dict[str, Any] | None = None):
    """One RNG record per (pp, tp, cp, dp) rank; loadable only at the layout that saved it."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_context_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


# --- save ------------------------------------------------------------------------------------


def _sharding_metadata(optimizer_sharding: str) -> dict[str, Any]:
    return {
        "distrib_optim_sharding_type": optimizer_sharding,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }


def _with_dp_group(metadata: dict[str, Any] | None) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    return {
        **(metadata or {}),
        "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
    }


def _save_strategy():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    # Replicated tensors (DP copies) are written once, with the writes spread over DP ranks.
    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy("torch_dist"),
        ps.get_data_parallel_group(with_context_parallel=True),
    )


def _model_and_optimizer_state(
    model: Any, optimizer: Any, metadata: dict[str, Any], *, is_loading: bool
) -> dict[str, Any]:
    """Sharded state dicts of the model and (built on it) the optimizer."""
    _ensure_adam_state(optimizer)
    model_state = model.sharded_state_dict(metadata=_with_dp_group(metadata))
    optimizer_state = optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=_with_dp_group(metadata)
    )
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    trainer_state: dict[str, Any],
    model_description: ModelMetadata,
    optimizer_sharding: str,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    incomplete = incomplete_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(incomplete, ignore_errors=True)
        incomplete.mkdir()
    torch.distributed.barrier()

    metadata = _sharding_metadata(optimizer_sharding)
    state = {
        **_model_and_optimizer_state(model, optimizer, metadata, is_loading=False),
        "opt_param_scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "rng_state": _sharded_rng_state(_rng_state()),
        TRAINER_STATE_KEY: {
            "version": TRAINER_STATE_VERSION,
            "layout": _layout(),
            **trainer_state,
        },
    }
    final = root / iteration_dir_name(iteration)
    # A full disk surfaces deep in DCP's per-rank failures or torch's zip writer: say so.
    with disk_full_as_error(final):
        dist_checkpointing.save(
            state, str(incomplete), sharded_strategy=_save_strategy(), content_metadata=metadata
        )
    torch.distributed.barrier()
    if rank == 0:
        with disk_full_as_error(final):
            # So that Megatron-Bridge takes it as a pretrained checkpoint. The optimizer and RNG
            # state are in our trainer's layout: Bridge is told there are none to restore.
            layout = _layout()
            write_bridge_run_config(
                incomplete,
                tensor_parallel=layout["tensor"],
                pipeline_parallel=layout["pipeline"],
            )
            if not (root / MODEL_METADATA_FILE).is_file():
                model_description.write(root)
            publish_iteration(root, iteration)
    torch.distributed.barrier()
    return final


# --- load ------------------------------------------------------------------------------------


def _common_state(path: Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path))


def saved_schedule(root: str | os.PathLike) -> dict[str, Any] | None:
    """The LR schedule (scheduler state dict) of the tracker's checkpoint under ``root``;
    None for a checkpoint without one (not written by this trainer)."""
    return _common_state(checkpoint_dir(root)).get("opt_param_scheduler")


def load_checkpoint(
    root: str | os.PathLike, *, model: Any, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Resume state from the tracker's checkpoint; returns the trainer state (iteration, ...).

    Optimizer state saved as ``dp_reshardable`` loads only at the TP/PP it was saved at;
    RNG state only at the exact layout (otherwise it is left as seeded, as Megatron-LM does).
    """
    from megatron.core import dist_checkpointing

    path = checkpoint_dir(root)
    common = _common_state(path)
    if TRAINER_STATE_KEY not in common:
        raise MegatronCheckpointError(
            f"{path} was not written by `megatron-eaft finetune`: it has no optimizer state to "
            "resume from (use it as model.checkpoint instead)"
        )
    trainer_state = common[TRAINER_STATE_KEY]
    saved_layout = trainer_state["layout"]
    layout = _layout()
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    same_model_parallel = all(
        saved_layout[k] == layout[k] for k in ("tensor", "pipeline", "context")
    )
    if (
        not same_model_parallel
        and metadata.get("distrib_optim_sharding_type") == "dp_reshardable"
        and _uses_distributed_optimizer(optimizer)
    ):
        raise MegatronCheckpointError(
            f"{path} was saved at TP/PP/CP {saved_layout['tensor']}/{saved_layout['pipeline']}/"
            f"{saved_layout['context']} with checkpoint.optimizer_sharding=dp_reshardable, which "
            "resumes only at that layout; save with fully_reshardable to change it"
        )
    request = _model_and_optimizer_state(model, optimizer, metadata, is_loading=True)
    restore_rng = saved_layout == layout
    if restore_rng:
        request["rng_state"] = _sharded_rng_state()
    loaded = dist_checkpointing.load(request, str(path))
    load_model_state(model, loaded["model"], path, strict=False)
    # The distributed optimizer copies into fp32 main parameters that can be views of the
    # model's own (leaf, requires-grad) parameters.
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if restore_rng:
        _set_rng_state(loaded["rng_state"])
    return {**trainer_state, "iteration": int(loaded["iteration"]), "rng_restored": restore_rng}


def _ensure_adam_state(optimizer: Any) -> None:
    """Give torch Adam (used when neither Apex nor Transformer Engine is installed) its state.

    Megatron's DistributedOptimizer.state_dict() reads the per-parameter ``step`` of the inner
    torch optimizer, which has no state before its first step: saving at iteration 0, or
    building the state dict to resume into, would fail. Zero state with step 0 is what torch
    Adam would create; loading overwrites it.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(part, distrib_optimizer.DistributedOptimizer):
            continue
        inner = part.optimizer
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }


def _restore_adam_steps(optimizer: Any, loaded: Any) -> None:
    """Set torch Adam's per-parameter ``step`` to the saved one, one tensor per parameter.

    Without Apex / Transformer Engine, DistributedOptimizer keeps the step in torch Adam's
    per-parameter state. Its load_state_dict() first sets it from the saved param groups,
    then its parameter-state loader copies over it the step the state had before loading
    (0), and the tensor it sets is shared by every parameter (torch Adam increments each in
    place). Either error breaks the bias correction of every later step.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    parts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if len(parts) == 1:
        states = [loaded]
    elif isinstance(loaded, dict):
        states = [value for _, value in sorted(loaded.items())]
    else:
        states = list(loaded)
    for part, state in zip(parts, states, strict=True):
        if not isinstance(part, distrib_optimizer.DistributedOptimizer):
            continue
        steps = {group.get("step") for group in state["optimizer"]["param_groups"]}
        if len(steps) != 1 or None in steps:
            raise MegatronCheckpointError(f"saved optimizer steps are inconsistent: {steps}")
        (step,) = steps
        for param_state in part.optimizer.state.values():
            param_state["step"] = torch.tensor(float(step))


def _uses_distributed_optimizer(optimizer: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(part, DistributedOptimizer) for part in parts)
