"""Megatron-LM's GPT SFT entry point with EAFT switched on.

This is ``pretrain_gpt.py`` (Megatron-LM, core >= 0.18) with two things swapped in from
``megatron_eaft.megatron.megatron_lm``: the ``--eaft-*`` flags (``add_eaft_args``) and the
forward step whose loss is the EAFT-weighted cross-entropy. Datasets are Megatron's own:
``--sft`` reads chat JSONL through ``megatron.training.datasets.sft_dataset.SFTDataset``
(packed rows, THD attention), otherwise ``GPTDataset`` on indexed data (``--data-path``) or
``MockGPTDataset`` (``--mock-data``). Launch it like pretrain_gpt.py; see run_sft_eaft.sh.

On Megatron-Core 0.19+ the model is built from the flags (``GPTModelConfig``); on 0.18, put
Megatron-LM's checkout on PYTHONPATH so ``model_provider`` / ``gpt_builders`` import.

Without a GPU (tests, CI) the same entry trains on CPU ranks: add ``--distributed-backend gloo
--transformer-impl local --no-gradient-accumulation-fusion --no-bias-swiglu-fusion
--no-bias-dropout-fusion --no-masked-softmax-fusion --no-rope-fusion --num-workers 0`` and
export ``CUDA_DEVICE_MAX_CONNECTIONS=1`` for TP > 1; ``launch_pretrain`` applies the CPU
workarounds of ``megatron_eaft.megatron.cpu_runtime`` itself. A complete tiny command line
(TP=2, mock data) is in tests/adapters/test_megatron_lm_pretrain.py.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.training import get_args, print_rank_0
from megatron.training.datasets.sft_dataset import SFTDataset
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from megatron_eaft.megatron.megatron_lm import forward_step, launch_pretrain


def dataset_config_from_args(args) -> GPTDatasetConfig:
    """The GPTDatasetConfig pretrain_gpt.py builds, for the fields this entry point uses."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    values = {
        "random_seed": args.seed,
        "sequence_length": args.seq_length,
        "blend": blend,
        "blend_per_split": blend_per_split,
        "split": args.split,
        "num_dataset_builder_threads": args.num_dataset_builder_threads,
        "path_to_cache": args.data_cache_path,
        "mmap_bin_files": args.mmap_bin_files,
        "tokenizer": build_tokenizer(args),
        "reset_position_ids": args.reset_position_ids,
        "reset_attention_mask": args.reset_attention_mask,
        "eod_mask_loss": args.eod_mask_loss,
        "create_attention_mask": args.create_attention_mask_in_dataloader,
        # SFTDataset pads each packed row to a multiple of what CP (and SP) split it into;
        # it reads these sizes from the config, which has no usable default for them.
        "context_parallel_size": args.context_parallel_size,
        "data_parallel_size": args.data_parallel_size,
        "sequence_parallel_size": args.tensor_model_parallel_size * args.sequence_parallel,
        "hybrid_context_parallel": getattr(args, "hybrid_context_parallel", False),
    }
    # Core versions differ in which of these fields GPTDatasetConfig has.
    known = {field.name for field in dataclasses.fields(GPTDatasetConfig) if field.init}
    return GPTDatasetConfig(**{key: value for key, value in values.items() if key in known})


def is_dataset_built_on_rank(vp_stage=None, packed: bool = False) -> bool:
    # Packed (SFT) rows carry cu_seqlens every pipeline stage needs; otherwise only the
    # stages that embed tokens or compute the loss read data. TP rank 0 reads, then broadcasts.
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return False
    return packed or is_first_or_last_pipeline_stage(vp_stage)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    if args.sft:
        dataset_type = SFTDataset
    elif args.mock_data:
        dataset_type = MockGPTDataset
    else:
        dataset_type = GPTDataset
    print_rank_0(f"> building {dataset_type.__name__} train/valid/test datasets (EAFT run)")
    return BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        partial(is_dataset_built_on_rank, vp_stage=vp_stage, packed=bool(args.sft)),
        dataset_config_from_args(args),
    ).build()


def model_provider_for_this_core():
    """None on core 0.19+ (the model comes from the flags); Megatron-LM's provider on 0.18."""
    try:
        from megatron.training.argument_utils import gpt_config_from_args  # noqa: F401
    except ImportError:
        from gpt_builders import gpt_builder  # a Megatron-LM checkout on PYTHONPATH
        from model_provider import model_provider

        return partial(model_provider, gpt_builder)
    return None


if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True
    launch_pretrain(
        train_valid_test_datasets_provider,
        model_provider_for_this_core(),
        forward_step_func=forward_step,
        args_defaults={"tokenizer_type": "SFTTokenizer"},
    )
