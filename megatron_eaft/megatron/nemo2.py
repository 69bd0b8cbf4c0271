"""EAFT in NeMo 2 fine-tuning recipes (``nemo.collections.llm``, nemo-toolkit 2.6 / 2.7).

NeMo 2's GPTModel (a LightningModule) computes the loss inside its Megatron-Core model: its
``forward_step`` calls ``config.forward_step_fn`` (``gpt_forward_step``), whose output is the
per-token loss of ``compute_language_model_loss``, and its ``training_loss_reduction`` /
``validation_loss_reduction`` (``MaskedTokenLossReduction``) turn that into the micro-batch loss
and the logged ``reduced_train_loss`` / ``val_loss``. :class:`EAFTCallback` plugs EAFT into both
without touching the recipe's model or config (both stay serialisable for NeMo's checkpoint
context):

- on the module instance, ``forward_step`` installs the EAFT seam
  (:func:`megatron_eaft.megatron.loss.install_eaft_loss`) on the Megatron-Core model at its
  first call, then runs the recipe's own forward step unchanged;
- the loss reductions become :class:`EAFTLossReduction`: training optimises the weighted loss,
  validation reports the plain cross-entropy as ``val_loss`` (comparable across kinds), and the
  EAFT report (``lm loss``, ``eaft loss``, ``eaft/mean_weight``, ...; the same keys as the
  Megatron-LM and Bridge adapters) is averaged over the global batch and logged every step.

In a NeMo-Run recipe: ``recipe.trainer.callbacks.append(run.Config(EAFTCallback, kind="eaft"))``
(see :func:`add_eaft_to_recipe`). The options are :class:`megatron_eaft.ops.EAFTConfig`'s.

NeMo 2.6 / 2.7 run on Megatron-Core 0.15, below the floor (0.17) of the rest of megatron-eaft;
this module uses only the ops and the seam, which need nothing newer, except ``fused_output``
(Megatron-Core >= 0.19's output-processor hook), refused here up front.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from nemo.lightning.megatron_parallel import MaskedTokenLossReduction

from megatron_eaft.megatron.loss import (
    eaft_loss_func,
    install_eaft_loss,
    installed_config,
    unwrap_model,
)
from megatron_eaft.ops import EAFTConfig

logger = logging.getLogger(__name__)

# Logged once per training step, after the global batch is reduced.
_REPORT_PREFIX = "eaft_report/"


class EAFTLossReduction(MaskedTokenLossReduction):
    """NeMo's masked-token loss reduction for the EAFT per-token loss, with the EAFT report.

    ``forward`` keeps NeMo's contract ``(loss_sum, num_tokens, {"loss_sum_and_ub_size": ...})``
    and adds the report pairs ``[sum, count]``; ``reduce`` returns NeMo's token-averaged loss
    and leaves the global batch's report means in :attr:`metrics`.
    """

    def __init__(
        self, config: EAFTConfig, validation_step: bool = False, val_drop_last: bool = True
    ) -> None:
        super().__init__(validation_step=validation_step, val_drop_last=val_drop_last)
        self.config = config
        self.metrics: dict[str, float] = {}

    def forward(
        self, batch: dict[str, torch.Tensor], forward_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(forward_out, tuple):  # (loss, loss_mask), as NeMo's reduction accepts
            forward_out, batch["loss_mask"] = forward_out
        loss_sum, num_tokens, report = eaft_loss_func(
            batch["loss_mask"],
            forward_out,
            config=self.config,
            training=not self.validation_step,
            check_for_nan=False,  # NeMo's strategy has its own NaN handling
        )
        if self.validation_step and not self.val_drop_last and num_tokens == 0:
            loss_sum = torch.zeros_like(loss_sum)
        loss_sum_and_ub_size = torch.stack([loss_sum.detach().float(), num_tokens.float()])
        reduced = {"loss_sum_and_ub_size": loss_sum_and_ub_size}
        reduced.update({_REPORT_PREFIX + key: pair for key, pair in report.items()})
        return loss_sum, num_tokens, reduced

    def reduce(self, losses_reduced_per_micro_batch: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        loss = super().reduce(losses_reduced_per_micro_batch)
        self.metrics = _global_batch_means(losses_reduced_per_micro_batch)
        return loss


def _global_batch_means(micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each report key's ``sum / count`` over the micro-batches and the data-parallel ranks."""
    from megatron.core import parallel_state

    keys = sorted({k for m in micro_batches for k in m if k.startswith(_REPORT_PREFIX)})
    if not keys:
        return {}
    totals = torch.stack(
        [torch.stack([m[k] for m in micro_batches if k in m]).sum(dim=0) for k in keys]
    )
    torch.distributed.all_reduce(
        totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    means = (totals[:, 0] / totals[:, 1].clamp_min(1)).tolist()
    return {k.removeprefix(_REPORT_PREFIX): value for k, value in zip(keys, means, strict=True)}


def enable_eaft(module: pl.LightningModule, config: EAFTConfig) -> None:
    """Make a NeMo 2 ``llm.GPTModel`` train with EAFT (idempotent)."""
    if config.fused_output:
        raise ValueError(
            "eaft fused_output is not available through NeMo 2: it needs Megatron-Core >= 0.19's "
            "output-processor hook, and nemo-toolkit 2.6/2.7 run on Megatron-Core 0.15"
        )
    for name in ("forward_step", "_training_loss_reduction", "_validation_loss_reduction"):
        if not hasattr(module, name):
            raise TypeError(
                f"{type(module).__name__} is not a NeMo 2 GPTModel (no {name}): EAFTCallback "
                "needs nemo.collections.llm's GPTModel or a subclass of it"
            )
    module._training_loss_reduction = EAFTLossReduction(config)
    module._validation_loss_reduction = EAFTLossReduction(config, validation_step=True)
    recipe_forward_step = type(module).forward_step.__get__(module)

    def forward_step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The Megatron-Core model exists only after Lightning's configure_model.
        for chunk in _model_chunks(module):
            if installed_config(chunk) != config:
                install_eaft_loss(chunk, config)
        return recipe_forward_step(batch)

    module.forward_step = forward_step


def _model_chunks(module: pl.LightningModule) -> list[torch.nn.Module]:
    core = getattr(module, "module", None)
    if core is None:
        raise RuntimeError("the NeMo GPTModel has no Megatron-Core model yet (configure_model)")
    chunks = list(core) if isinstance(core, torch.nn.ModuleList) else [core]
    return [unwrap_model(chunk) for chunk in chunks]


class EAFTCallback(pl.Callback):
    """A Lightning callback that makes a NeMo 2 ``llm.GPTModel`` fine-tune with EAFT.

    Keyword arguments are :class:`megatron_eaft.ops.EAFTConfig`'s options (``kind``, ``topk``,
    ``alpha``, ``entropy``, ``norm``, ...), validated here, before the model is built.
    """

    def __init__(self, **options: Any) -> None:
        known = {field.name for field in dataclasses.fields(EAFTConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"EAFTCallback: unknown option(s) {', '.join(unknown)}; "
                f"the options are {', '.join(sorted(known))}"
            )
        self.config = EAFTConfig(**options)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        enable_eaft(pl_module, self.config)
        logger.info("EAFT enabled in the NeMo 2 model: %s", self.config)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        metrics = _from_last_pipeline_stage(pl_module._training_loss_reduction.metrics)
        for key, value in metrics.items():
            pl_module.log(key, value, batch_size=1)


def _from_last_pipeline_stage(metrics: dict[str, float]) -> dict[str, float]:
    """The last pipeline stage's report on every rank (only that stage computes the loss)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    holder = [metrics]
    torch.distributed.broadcast_object_list(
        holder,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return holder[0]


def add_eaft_to_recipe(recipe: Any, **options: Any) -> Any:
    """Append :class:`EAFTCallback` (as a NeMo-Run config) to a recipe's trainer; returns it.

    The options are checked now, so a typo fails before a job is submitted.
    """
    import nemo_run as run

    EAFTCallback(**options)
    callbacks = list(recipe.trainer.callbacks or [])
    if any(getattr(c, "__fn_or_cls__", None) is EAFTCallback for c in callbacks):
        raise ValueError("the recipe's trainer already has an EAFTCallback")
    callbacks.append(run.Config(EAFTCallback, **options))
    recipe.trainer.callbacks = callbacks
    return recipe
