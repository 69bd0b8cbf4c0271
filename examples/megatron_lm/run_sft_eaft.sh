#!/usr/bin/env bash
# EAFT SFT with Megatron-LM's trainer: pretrain_gpt_eaft.py = pretrain_gpt.py + --eaft-* flags.
#
#   bash examples/megatron_lm/run_sft_eaft.sh /ckpt/qwen3-4b-megatron /data/sft.jsonl /ckpt/out
#
# The model flags below are Qwen3-4B's; the checkpoint is a torch_dist one, e.g. from
# `megatron-eaft convert import --hf /models/Qwen3-4B --out /ckpt/qwen3-4b-megatron`.
# SFT_JSONL: one {"messages": [...]} conversation per line, read by Megatron's SFTDataset
# and its SFTTokenizer with the HF chat template (prompt format "default"). With that format
# Megatron-LM (0.19) keeps every token in the loss, system and user turns included; for a loss
# on assistant tokens only, use `megatron-eaft prepare-data` + `megatron-eaft finetune`.
# One node of 8 GPUs via torchrun; under SLURM see examples/slurm/.
set -euo pipefail

PRETRAINED=${1:?usage: run_sft_eaft.sh PRETRAINED_CKPT SFT_JSONL SAVE_DIR [HF_TOKENIZER]}
SFT_DATA=${2:?usage: run_sft_eaft.sh PRETRAINED_CKPT SFT_JSONL SAVE_DIR [HF_TOKENIZER]}
SAVE_DIR=${3:?usage: run_sft_eaft.sh PRETRAINED_CKPT SFT_JSONL SAVE_DIR [HF_TOKENIZER]}
TOKENIZER=${4:-${PRETRAINED}/hf}
GPUS=${GPUS:-8}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

MODEL_ARGS=(
    --num-layers 36 --hidden-size 2560 --ffn-hidden-size 9728
    --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128
    --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear --qk-layernorm
    --position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0
    --max-position-embeddings 40960 --seq-length 4096
    --attention-dropout 0.0 --hidden-dropout 0.0 --bf16
)
SFT_ARGS=(
    --sft --data-path "${SFT_DATA}" --split "98,2,0"
    --tokenizer-type SFTTokenizer --tokenizer-model "${TOKENIZER}" --sft-tokenizer-prompt-format default
    --micro-batch-size 1 --global-batch-size 64
    --train-iters 2000 --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --lr-warmup-iters 50
    --weight-decay 0.0 --clip-grad 1.0 --adam-beta2 0.95
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel
    --use-distributed-optimizer
    --pretrained-checkpoint "${PRETRAINED}" --finetune --no-load-optim --no-load-rng
    --save "${SAVE_DIR}" --load "${SAVE_DIR}" --save-interval 500 --ckpt-format torch_dist
    --log-interval 10 --eval-interval 200 --eval-iters 20 --tensorboard-dir "${SAVE_DIR}/tb"
)
# EAFT: the paper's setting (top-20 entropy, divided by ln 20, alpha 1), plus its diagnostics.
EAFT_ARGS=(
    --eaft-kind eaft --eaft-topk 20 --eaft-alpha 1.0 --eaft-entropy topk --eaft-norm lnk
    --eaft-diagnostics --eaft-conflict-entropy-threshold 0.15 --eaft-conflict-prob-threshold 0.15
)

exec torchrun --nproc-per-node "${GPUS}" "${HERE}/pretrain_gpt_eaft.py" \
    "${MODEL_ARGS[@]}" "${SFT_ARGS[@]}" "${EAFT_ARGS[@]}"
