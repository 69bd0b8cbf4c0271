"""One NeMo 2 ``llm.finetune`` run of a tiny Qwen3 on CPU (gloo), its per-step metrics as JSON.

    python tests/nemo2/finetune_run.py WORK_DIR OUT_JSON [--eaft-kind KIND ...] [--tp N]

Run in a fresh process per run (NeMo initialises Megatron's global state once per process);
Lightning re-runs this script for each extra device. Without ``--eaft-kind`` the run is NeMo's
own (no EAFTCallback). The CPU settings are the ones ``apply_nemo2_cpu_patches`` names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from megatron_eaft.megatron import cpu_runtime

cpu_runtime.apply_nemo2_cpu_patches()

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from nemo import lightning as nl  # noqa: E402
from nemo.collections import llm  # noqa: E402
from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import (  # noqa: E402
    AutoTokenizer,
)

from megatron_eaft.megatron.megatron_lm import add_eaft_args, eaft_config_from_args  # noqa: E402
from megatron_eaft.megatron.nemo2 import EAFTCallback  # noqa: E402

SEQ_LENGTH = 64
STEPS = 3


class MetricsRecorder(pl.Callback):
    """Every training step's logged metrics, as floats."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def tiny_qwen3(vocab_size: int) -> llm.Qwen3Config:
    return llm.Qwen3Config(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        seq_length=SEQ_LENGTH,
        vocab_size=vocab_size,
        make_vocab_size_divisible_by=128,
        bf16=False,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("out_json", type=Path)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--no-eaft", action="store_true", help="NeMo's own loss, no callback")
    add_eaft_args(parser)
    args = parser.parse_args()

    tokenizer = AutoTokenizer(str(args.work_dir / "tokenizer"))
    model = llm.Qwen3Model(tiny_qwen3(vocab_size=384), tokenizer=tokenizer)
    data = llm.FineTuningDataModule(
        dataset_root=args.work_dir / "data",
        seq_length=SEQ_LENGTH,
        micro_batch_size=1,
        global_batch_size=2,
        tokenizer=tokenizer,
        num_workers=0,
        pin_memory=False,
        # Its all-reduce of a torch.cuda.LongTensor sanity count needs a GPU.
        dataset_kwargs={"sanity_check_dist_workers": False},
    )
    callbacks: list[pl.Callback] = []
    if not args.no_eaft:
        callbacks.append(EAFTCallback(**dataclasses.asdict(eaft_config_from_args(args))))
    recorder = MetricsRecorder()  # last: it reads what the callbacks before it logged
    callbacks.append(recorder)
    trainer = nl.Trainer(
        accelerator="cpu",
        devices=args.tp * args.pp,
        max_steps=STEPS,
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,  # NeMo's checkpoint callback imports nvidia_resiliency_ext
        strategy=nl.MegatronStrategy(
            tensor_model_parallel_size=args.tp,
            pipeline_model_parallel_size=args.pp,
            ckpt_async_save=False,
            ddp="megatron",
        ),
        plugins=nl.MegatronMixedPrecision(precision="32"),
        callbacks=callbacks,
    )
    optim = nl.MegatronOptimizerModule(
        config=OptimizerConfig(
            optimizer="adam", lr=1e-3, bf16=False, use_distributed_optimizer=False
        )
    )
    llm.finetune(
        model, data, trainer, log=nl.NeMoLogger(log_dir=str(args.work_dir / "logs")), optim=optim
    )
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        args.out_json.write_text(json.dumps(recorder.steps))


if __name__ == "__main__":
    sys.exit(main())
