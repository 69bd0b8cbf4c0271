"""Qwen3 full SFT with a Megatron-Bridge recipe and the EAFT forward step.

    # once: HF -> Megatron (Bridge's own converter; or `megatron-eaft convert import`)
    python -c "from megatron.bridge import AutoBridge; \
               AutoBridge.import_ckpt('Qwen/Qwen3-8B', '/ckpt/qwen3-8b')"
    # then, on 4+ GPUs:
    torchrun --nproc-per-node 4 examples/bridge/qwen3_eaft_sft.py \
        --size 8b --pretrained-checkpoint /ckpt/qwen3-8b --save /ckpt/qwen3-8b-eaft \
        --eaft-kind eaft --eaft-topk 20

Everything but the loss is the recipe's (parallelism, optimizer, packed SQuAD SFT data,
checkpointing); EAFT is switched on by ``enable_eaft``: a pre-wrap hook installs the loss on
each model chunk and the returned callable is Bridge's forward step. Bridge logs "lm loss"
(unweighted CE, comparable with plain SFT runs) next to "eaft loss", "eaft/mean_weight",
"eaft/mean_entropy" and "eaft/confident_conflict_frac".
"""

from __future__ import annotations

import argparse

from megatron_eaft.megatron.bridge import enable_eaft, use_local_sft_data
from megatron_eaft.megatron.megatron_lm import add_eaft_args, eaft_config_from_args

# Bridge renamed its recipes across 0.2 -> 0.6 and keeps the old names as aliases.
RECIPE_NAME_PATTERNS = ("qwen3_{size}_sft_config", "qwen3_{size}_finetune_config")


def qwen3_sft_recipe(size: str):
    """Bridge's Qwen3 SFT recipe function of this size (not yet called: it fetches the HF
    config of its model)."""
    from megatron.bridge.recipes import qwen

    for pattern in RECIPE_NAME_PATTERNS:
        recipe = getattr(qwen, pattern.format(size=size), None)
        if recipe is not None:
            return recipe
    known = sorted(n for n in dir(qwen) if n.startswith("qwen3_") and "sft" in n)
    raise SystemExit(f"no Qwen3 {size} SFT recipe in this Megatron-Bridge; it has: {known}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", default="8b", help="Qwen3 size of the recipe (600m, 1p7b, 4b, 8b, 14b, 32b)"
    )
    parser.add_argument(
        "--pretrained-checkpoint", required=True, help="Megatron checkpoint to start from"
    )
    parser.add_argument("--save", required=True, help="where Bridge writes checkpoints")
    parser.add_argument("--train-iters", type=int, default=None, help="override the recipe's")
    parser.add_argument(
        "--dataset-root",
        default=None,
        help="local SFT JSONL/packed directory (default: the recipe's SQuAD from the HF hub)",
    )
    return add_eaft_args(parser).parse_args(argv)


def main() -> None:
    args = parse_args()
    eaft = eaft_config_from_args(args)
    cfg = qwen3_sft_recipe(args.size)()
    cfg.checkpoint.pretrained_checkpoint = args.pretrained_checkpoint
    cfg.checkpoint.save = args.save
    if args.train_iters is not None:
        cfg.train.train_iters = args.train_iters
    if args.dataset_root is not None:
        use_local_sft_data(cfg, args.dataset_root)
    forward_step = enable_eaft(cfg, eaft)

    from megatron.bridge.training.finetune import finetune

    finetune(cfg, forward_step_func=forward_step)


if __name__ == "__main__":
    main()
