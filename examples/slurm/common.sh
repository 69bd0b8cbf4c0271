# shellcheck shell=bash
# Shared steps of the EAFT sbatch scripts. Sourced by them, never run on its own.
#
# A model script sets MODEL_NAME, MODEL_CONFIG and SEQ_LENGTH, sources this file and calls
# eaft_main, which runs, inside the job:
#   1. HF -> Megatron conversion (once: skipped when $CKPT_DIR exists; the converter writes
#      atomically, so an existing directory is a complete checkpoint);
#   2. data preparation (once: skipped when $DATA_DIR/metadata.json exists);
#   3. the job's configuration: $MODEL_CONFIG plus --set overrides for the paths, resuming
#      from $SAVE_DIR when it holds latest_checkpointed_iteration.txt, else starting from the
#      converted checkpoint; checked on one task (--print-config) and kept in $RUN_DIR/configs;
#   4. `megatron-eaft finetune` with one task per GPU (srun), or one torchrun per node
#      (LAUNCHER=torchrun), never both;
#   5. on SIGTERM (#SBATCH --signal=B:TERM@...) the signal is passed to the trainer, which
#      checkpoints at the end of its step and exits 0; the job is then requeued.
#
# Settings (environment at submission; sbatch exports it):
#   HF_DIR            HF model directory (config.json, safetensors, tokenizer)      [required]
#   DATA_JSONL        chat or prompt/response JSONL (space-separated list); needed
#                     only while $DATA_DIR is not prepared yet
#   WORK_DIR          root of what the job writes     [default: $SLURM_SUBMIT_DIR/eaft_work]
#   CKPT_DIR          converted checkpoint            [default: $WORK_DIR/checkpoints/$MODEL_NAME]
#   DATA_DIR          prepared dataset                [default: $WORK_DIR/data/$MODEL_NAME-$SEQ_LENGTH]
#   RUN_DIR           checkpoints/, tensorboard/, metrics.jsonl, configs/
#                                                     [default: $WORK_DIR/runs/$MODEL_NAME]
#   CONTAINER_IMAGE   pyxis/enroot image (squashfs path or registry#image); empty = no container
#   CONTAINER_MOUNTS  pyxis --container-mounts, e.g. /lustre:/lustre (must cover every path above)
#   CONTAINER_WORKDIR pyxis --container-workdir
#   LAUNCHER          srun (one task per GPU, default) | torchrun (one torchrun per node)
#   GPUS_PER_NODE     [default: 8]
#   EAFT_CMD          command running the CLI in the container [default: megatron-eaft]
#   CONVERT_ARGS      extra `convert import` flags [default: --dtype bf16 --transformer-impl transformer_engine]
#   PREPARE_ARGS      extra `prepare-data` flags, e.g. "--loss-on last"
#   PREPARE_WORKERS   tokenisation processes [default: $SLURM_CPUS_PER_TASK or 8]
#   SRUN_ARGS         extra srun flags for every step, e.g. "--mpi=pmix"
#   DRY_RUN=1         print every step instead of running it
# Flag lists are split on whitespace.

eaft_log() { printf '[eaft %(%F %T)T] %s\n' -1 "$*" >&2; }
eaft_die() {
  eaft_log "error: $*"
  exit 1
}

eaft_log_command() {
  local quoted
  printf -v quoted '%q ' "$@"
  eaft_log "+ ${quoted% }"
}

# Prints a command (shell-quoted) and runs it unless DRY_RUN=1.
eaft_run() {
  eaft_log_command "$@"
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    "$@"
  fi
}

# The port both launch modes use, derived from the job id like megatron_eaft.launch does, so
# two jobs sharing a node do not collide.
eaft_master_port() { echo $((10000 + ${SLURM_JOB_ID:-0} % 20000)); }

eaft_defaults() {
  : "${MODEL_NAME:?the sbatch script must set MODEL_NAME}"
  : "${MODEL_CONFIG:?the sbatch script must set MODEL_CONFIG}"
  : "${SEQ_LENGTH:?the sbatch script must set SEQ_LENGTH}"
  : "${HF_DIR:?set HF_DIR to the Hugging Face model directory}"
  WORK_DIR=${WORK_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/eaft_work}
  CKPT_DIR=${CKPT_DIR:-$WORK_DIR/checkpoints/$MODEL_NAME}
  DATA_DIR=${DATA_DIR:-$WORK_DIR/data/$MODEL_NAME-$SEQ_LENGTH}
  RUN_DIR=${RUN_DIR:-$WORK_DIR/runs/$MODEL_NAME}
  SAVE_DIR=$RUN_DIR/checkpoints
  LAUNCHER=${LAUNCHER:-srun}
  GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  NUM_NODES=${SLURM_JOB_NUM_NODES:-1}
  PREPARE_WORKERS=${PREPARE_WORKERS:-${SLURM_CPUS_PER_TASK:-8}}
  read -r -a EAFT_CMD_ARGS <<<"${EAFT_CMD:-megatron-eaft}"
  read -r -a CONVERT_EXTRA_ARGS <<<"${CONVERT_ARGS:---dtype bf16 --transformer-impl transformer_engine}"
  read -r -a PREPARE_EXTRA_ARGS <<<"${PREPARE_ARGS:-}"
  read -r -a SRUN_EXTRA_ARGS <<<"${SRUN_ARGS:-}"
  case $LAUNCHER in
    srun | torchrun) ;;
    *) eaft_die "LAUNCHER=$LAUNCHER: expected srun or torchrun" ;;
  esac
  [[ -f $MODEL_CONFIG ]] || eaft_die "config not found: $MODEL_CONFIG"
}

# NCCL / allocator settings for Megatron-Core training on NVIDIA GPUs.
eaft_setup_env() {
  export CUDA_DEVICE_MAX_CONNECTIONS=1 # Megatron's TP/SP communication overlap needs ordered kernels
  export TORCH_NCCL_AVOID_RECORD_STREAMS=1
  export NCCL_NVLS_ENABLE=0
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  # Saving or loading a 32B torch_dist checkpoint can keep ranks out of collectives for
  # minutes; the default 8-minute watchdog would kill the job.
  export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-1800}
  # LAUNCHER=torchrun: torchrun SIGKILLs workers 30 s (its default) after passing SIGTERM on,
  # which can cut a large checkpoint save short; the job's time limit bounds the wait anyway.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TOKENIZERS_PARALLELISM=false
  export HF_HUB_OFFLINE=1 # compute nodes read $HF_DIR; nothing is downloaded
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
}

# pyxis/enroot flags for every srun step (none without CONTAINER_IMAGE).
eaft_container_args() {
  CONTAINER_ARGS=()
  [[ -n ${CONTAINER_IMAGE:-} ]] || return 0
  # A named container is imported once per node and reused by every step of the job.
  CONTAINER_ARGS+=(--container-image="$CONTAINER_IMAGE" --container-name="eaft-${SLURM_JOB_ID:-0}")
  CONTAINER_ARGS+=(--no-container-mount-home)
  if [[ -n ${CONTAINER_MOUNTS:-} ]]; then
    CONTAINER_ARGS+=(--container-mounts="$CONTAINER_MOUNTS")
  fi
  if [[ -n ${CONTAINER_WORKDIR:-} ]]; then
    CONTAINER_ARGS+=(--container-workdir="$CONTAINER_WORKDIR")
  fi
}

# One task on the first node: conversion, data preparation, the configuration check.
eaft_run_single_task() {
  eaft_run srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "${SRUN_EXTRA_ARGS[@]}" "${CONTAINER_ARGS[@]}" "$@"
}

eaft_convert_once() {
  if [[ -d $CKPT_DIR ]]; then
    eaft_log "converted checkpoint found: $CKPT_DIR (conversion skipped)"
    return 0
  fi
  eaft_log "converting $HF_DIR -> $CKPT_DIR"
  eaft_run_single_task "${EAFT_CMD_ARGS[@]}" convert import --hf "$HF_DIR" --out "$CKPT_DIR" \
    "${CONVERT_EXTRA_ARGS[@]}"
}

eaft_prepare_data_once() {
  if [[ -f $DATA_DIR/metadata.json ]]; then
    eaft_log "prepared data found: $DATA_DIR (preparation skipped)"
    return 0
  fi
  [[ -n ${DATA_JSONL:-} ]] || eaft_die "$DATA_DIR is not prepared and DATA_JSONL is not set"
  local inputs
  read -r -a inputs <<<"$DATA_JSONL"
  eaft_log "preparing ${inputs[*]} -> $DATA_DIR"
  eaft_run_single_task "${EAFT_CMD_ARGS[@]}" prepare-data --input "${inputs[@]}" \
    --tokenizer "$HF_DIR" --output "$DATA_DIR" --seq-length "$SEQ_LENGTH" \
    --workers "$PREPARE_WORKERS" --no-progress "${PREPARE_EXTRA_ARGS[@]}"
}

# The per-job overrides of $MODEL_CONFIG; resumes from $SAVE_DIR when it holds a checkpoint.
eaft_job_overrides() {
  JOB_OVERRIDES=(
    --set "model.checkpoint=$CKPT_DIR"
    --set "data.path=$DATA_DIR"
    --set "checkpoint.save=$SAVE_DIR"
    --set "logging.tensorboard_dir=$RUN_DIR/tensorboard"
    --set "logging.metrics_file=$RUN_DIR/metrics.jsonl"
  )
  if [[ -f $SAVE_DIR/latest_checkpointed_iteration.txt ]]; then
    eaft_log "resuming from $SAVE_DIR (iteration $(<"$SAVE_DIR/latest_checkpointed_iteration.txt"))"
    JOB_OVERRIDES+=(--set "checkpoint.load=$SAVE_DIR")
  else
    eaft_log "no checkpoint in $SAVE_DIR: starting from the converted model $CKPT_DIR"
    JOB_OVERRIDES+=(--set "checkpoint.load=null")
  fi
}

# Checks the configuration on one task before the whole allocation starts, and keeps the
# resolved YAML of every (re)start next to the run.
eaft_check_config() {
  local resolved=$RUN_DIR/configs/config.${SLURM_JOB_ID:-0}.${SLURM_RESTART_COUNT:-0}.yaml
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    eaft_run_single_task "${EAFT_CMD_ARGS[@]}" finetune --config "$MODEL_CONFIG" \
      "${JOB_OVERRIDES[@]}" --print-config
    return 0
  fi
  mkdir -p "$RUN_DIR/configs"
  eaft_run_single_task "${EAFT_CMD_ARGS[@]}" finetune --config "$MODEL_CONFIG" \
    "${JOB_OVERRIDES[@]}" --print-config >"$resolved"
  eaft_log "configuration: $resolved"
}

# The training step: one task per GPU, or one torchrun per node.
eaft_finetune_step() {
  FINETUNE_STEP=(srun --nodes="$NUM_NODES" --kill-on-bad-exit=1 "${SRUN_EXTRA_ARGS[@]}"
    "${CONTAINER_ARGS[@]}")
  if [[ $LAUNCHER == srun ]]; then
    # Each task is one rank: megatron_eaft.launch reads SLURM_PROCID / SLURM_LOCALID /
    # SLURM_JOB_NODELIST / SLURM_JOB_ID for the rendezvous.
    FINETUNE_STEP+=(--ntasks-per-node="$GPUS_PER_NODE" "${EAFT_CMD_ARGS[@]}"
      finetune --config "$MODEL_CONFIG" "${JOB_OVERRIDES[@]}")
  else
    local hosts master_addr
    # Not `| head -n 1`: with pipefail, scontrol's SIGPIPE would fail the job.
    hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
    master_addr=${hosts%%$'\n'*}
    # `megatron-eaft torchrun`: torchrun that exits 0 when SIGTERM stopped every worker cleanly
    # (torchrun itself exits 1 after any signal, so a time limit would read as a failure).
    FINETUNE_STEP+=(--ntasks-per-node=1 "${EAFT_CMD_ARGS[@]}" torchrun --nnodes="$NUM_NODES"
      --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d
      --rdzv-endpoint="$master_addr:$(eaft_master_port)" --rdzv-id="${SLURM_JOB_ID:-0}"
      -m megatron_eaft.cli.main finetune --config "$MODEL_CONFIG" "${JOB_OVERRIDES[@]}")
  fi
}

EAFT_STEP_PID=
EAFT_TERM_RECEIVED=0

# SIGTERM reaches the batch shell (--signal=B:TERM@...); srun passes it on to every task.
eaft_on_sigterm() {
  EAFT_TERM_RECEIVED=1
  eaft_log "SIGTERM: the trainer checkpoints at the end of its step and exits"
  if [[ -n $EAFT_STEP_PID ]]; then
    kill -TERM "$EAFT_STEP_PID" 2>/dev/null || true
  fi
}

# Runs a step in the background so that the trap above can run while it is going.
eaft_run_interruptible() {
  eaft_log_command "$@"
  [[ ${DRY_RUN:-0} != 1 ]] || return 0
  "$@" &
  EAFT_STEP_PID=$!
  local status
  while true; do
    status=0
    wait "$EAFT_STEP_PID" || status=$?
    # A trapped signal interrupts `wait` (status > 128) while the step keeps running.
    if ((status > 128)) && kill -0 "$EAFT_STEP_PID" 2>/dev/null; then
      continue
    fi
    break
  done
  EAFT_STEP_PID=
  return "$status"
}

eaft_main() {
  eaft_defaults
  eaft_setup_env
  eaft_container_args
  trap eaft_on_sigterm TERM
  eaft_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}): $MODEL_NAME on" \
    "$NUM_NODES node(s) x $GPUS_PER_NODE GPUs, launcher $LAUNCHER"
  eaft_convert_once
  eaft_prepare_data_once
  eaft_job_overrides
  eaft_check_config
  eaft_finetune_step
  local status=0
  eaft_run_interruptible "${FINETUNE_STEP[@]}" || status=$?
  if ((EAFT_TERM_RECEIVED)); then
    eaft_log "finetune stopped on SIGTERM (exit $status): requeueing job ${SLURM_JOB_ID:-}"
    eaft_run scontrol requeue "${SLURM_JOB_ID:?}"
    return 0
  fi
  if ((status != 0)); then
    eaft_die "finetune failed with exit status $status"
  fi
  eaft_log "finetune finished; checkpoints in $SAVE_DIR"
}
