"""Full fine-tuning of Qwen3 with EAFT through a NeMo 2 recipe (nemo-toolkit 2.6/2.7, NeMo-Run).

NeMo's own ``llm.<recipe>.finetune_recipe`` (model, trainer, optimizer, the HF checkpoint it
imports on first use), with the SFT data swapped for your JSONL files and EAFTCallback added to
the trainer. Inside a NeMo 2.7 container, on one node of a SLURM allocation:

    python examples/nemo2/qwen3_eaft_finetune.py --recipe qwen3_8b --dataset-root /data/sft \
        --dir /runs/qwen3-8b-eaft --gpus-per-node 8 --eaft-kind eaft

``--dataset-root`` holds NeMo's SFT files: training.jsonl, validation.jsonl (and test.jsonl),
one {"input": ..., "output": ...} object per line. ``--dryrun`` prints the recipe and exits.
The EAFT flags are megatron-eaft's (``--eaft-kind``, ``--eaft-topk``, ...; see ``--help``).
One node per launch (NeMo-Run's LocalExecutor with torchrun); for several nodes, hand the same
recipe to NeMo-Run's SlurmExecutor.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from megatron_eaft.megatron.megatron_lm import add_eaft_args, eaft_config_from_args
from megatron_eaft.megatron.nemo2 import add_eaft_to_recipe

# NeMo 2.7's Qwen3 recipes (nemo.collections.llm.recipes).
QWEN3_RECIPES = (
    "qwen3_600m",
    "qwen3_1p7b",
    "qwen3_4b",
    "qwen3_8b",
    "qwen3_14b",
    "qwen3_32b",
    "qwen3_30b_a3b",
    "qwen3_235b_a22b",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=QWEN3_RECIPES, required=True)
    parser.add_argument("--dataset-root", required=True, help="folder of NeMo SFT JSONL files")
    parser.add_argument("--dir", required=True, help="logs and checkpoints")
    parser.add_argument("--name", default="eaft")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--dryrun", action="store_true", help="print the recipe, run nothing")
    add_eaft_args(parser)
    args = parser.parse_args(argv)
    args.eaft = eaft_config_from_args(args)  # a bad EAFT flag fails here, named
    return args


def build_recipe(args: argparse.Namespace) -> Any:
    import nemo_run as run
    from nemo.collections import llm

    recipe = getattr(llm, args.recipe).finetune_recipe(
        dir=args.dir,
        name=args.name,
        num_nodes=1,
        num_gpus_per_node=args.gpus_per_node,
        peft_scheme=None,  # full fine-tuning, what EAFT is for
    )
    recipe.data = run.Config(
        llm.FineTuningDataModule,
        dataset_root=args.dataset_root,
        seq_length=args.seq_length,
        global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size,
    )
    if args.max_steps is not None:
        recipe.trainer.max_steps = args.max_steps
    return add_eaft_to_recipe(recipe, **dataclasses.asdict(args.eaft))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = build_recipe(args)
    if args.dryrun:
        print(recipe)
        return
    import nemo_run as run

    executor = run.LocalExecutor(ntasks_per_node=args.gpus_per_node, launcher="torchrun")
    run.run(recipe, executor=executor, name=args.name)


if __name__ == "__main__":
    main()
