#!/usr/bin/env bash
# shellcheck disable=SC2329  # the check functions are invoked through run_check
# GPU checks of megatron_eaft, for a person with one (or two) CUDA GPUs. Run from the repository
# root:   tools/gpu_check.sh            (PYTHON=path/to/python to pick the interpreter)
#
#   1. tiny Qwen3 + dataset     made with transformers and `convert import` (fp32)
#   2. finetune, local spec     one step, Megatron's local layers on the GPU
#   3. finetune, TE spec        one step with Transformer Engine layers: its loss must match 2
#                               (the first step's loss is a function of the same logits)
#   4. NCCL TP2                 (2+ GPUs) one TE step at TP 2: the loss must match 3
#   5. fused vs unfused, cuda   the fused op against the unfused one in bf16 on the GPU: loss,
#                               hidden and weight gradients (main_grad: addmm with out_dtype),
#                               both fused_gradient modes
#   6. finetune, TE, fused      one step with eaft.fused_output: the loss must match 3; again
#                               with eaft.fused_gradient=forward
#   7. bench_loss --device cuda bf16 CE vs EAFT top-K vs exact at T=4096, V=151936
#   8. bench_fused --device cuda bf16 output matmul + CE / EAFT vs fused, T=4096, V=151936, h=2560
#
# One table at the end (check, status, seconds, detail); exit status 1 if any check failed.
# Budget: under 10 minutes on one recent GPU. NOT YET RUN on a GPU: written against the APIs
# (Megatron-Core 0.19.2, torch 2.13, TE), checked with bash -n and shellcheck only.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export CUDA_DEVICE_MAX_CONNECTIONS=1
WORK=$(mktemp -d -t eaft_gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
TABLE=$WORK/table.tsv
: >"$TABLE"

record() { # name status seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$TABLE"
    printf '[gpu_check] %-26s %-7s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

# run_check NAME COMMAND...: runs it with its output in $WORK/NAME.log; the last line the
# command prints is the table's detail.
run_check() {
    local name=$1
    shift
    local log=$WORK/${name// /_}.log start=$SECONDS status=ok
    if ! "$@" >"$log" 2>&1; then
        status=FAIL
    fi
    record "$name" "$status" "$((SECONDS - start))" "$(tail -n 1 "$log" | cut -c1-110)"
    if [[ $status == FAIL ]]; then
        echo "----- $log (last 30 lines)"
        tail -n 30 "$log"
    fi
}

GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ $GPUS -lt 1 ]]; then
    echo "gpu_check: no CUDA device visible to $PYTHON (torch.cuda.device_count() = 0)" >&2
    exit 2
fi
TE=$("$PYTHON" -c 'import transformer_engine; print(transformer_engine.__version__)' 2>/dev/null \
    || echo none)
echo "gpu_check: $GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1);" \
    "Transformer Engine $TE; work dir $WORK"

make_inputs() {
    "$PYTHON" - "$WORK" <<'EOF'
import sys
from pathlib import Path

from tests.train import helpers

work = Path(sys.argv[1])
checkpoint = helpers.converted_tiny_checkpoint(work / "tiny")
data = helpers.write_sft_dataset(work / "data", packing="first-fit")
print(f"checkpoint {checkpoint}, data {data}")
EOF
}

# finetune NAME NPROC KEY=VALUE...: one optimizer step; prints "lm loss <value>".
finetune() {
    local name=$1 nproc=$2
    shift 2
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
        -m megatron_eaft.cli.main finetune \
        "model.checkpoint=$WORK/tiny/megatron" "data.path=$WORK/data" \
        data.micro_batch_size=1 data.global_batch_size=4 train.iterations=1 \
        optimizer.lr=1e-4 optimizer.warmup_iterations=0 eaft.kind=eaft eaft.check_finite=true \
        "checkpoint.save=$WORK/run_$name" "logging.metrics_file=$WORK/$name.jsonl" \
        logging.interval=1 "$@" || return 1
    "$PYTHON" - "$WORK/$name.jsonl" <<'EOF'
import json
import sys

record = json.loads(open(sys.argv[1]).read().splitlines()[-1])
print(f"lm loss {record['loss']['lm loss']:.6f} eaft loss {record['loss']['eaft loss']:.6f}")
EOF
}

# same_loss A B RTOL: compares the "lm loss" and "eaft loss" of two finetune logs.
same_loss() {
    "$PYTHON" - "$WORK/$1.jsonl" "$WORK/$2.jsonl" "$3" <<'EOF'
import json
import sys

a, b = (json.loads(open(p).read().splitlines()[-1])["loss"] for p in sys.argv[1:3])
rtol = float(sys.argv[3])
worst = max(abs(a[k] - b[k]) / abs(b[k]) for k in ("lm loss", "eaft loss"))
print(f"relative difference {worst:.2e} (allowed {rtol:g})")
sys.exit(0 if worst <= rtol else 1)
EOF
}

fused_on_cuda() {
    "$PYTHON" - <<'EOF'
import torch

from megatron_eaft.ops import (
    EAFTConfig,
    fused_output_weighted_cross_entropy,
    vocab_parallel_weighted_cross_entropy,
)

torch.manual_seed(0)
device = torch.device("cuda")
T, h, V = 3000, 1024, 32768
worst = {}
for entropy in ("topk", "exact"):
    config = EAFTConfig(kind="eaft", entropy=entropy, check_finite=True)
    hidden = torch.randn(T, h, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(V, h, device=device) * 0.05).to(torch.bfloat16)
    labels = torch.randint(0, V, (T,), device=device)
    labels[:7] = -100
    # recompute: any upstream gradient; forward: one value per weighted token (a differing one
    # would trip its asynchronous device assertion and end the CUDA context).
    upstreams = {"recompute": torch.rand(T, device=device), "forward": torch.full((T,), 0.37, device=device)}
    for gradient, grad in upstreams.items():
        paths = {}
        for fused in (False, True):
            x = hidden.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            main_grad = torch.zeros(V, h, device=device) if fused else None
            if fused:
                out = fused_output_weighted_cross_entropy(
                    x, w, labels, config, chunk_tokens=700, main_grad=main_grad, gradient=gradient
                )
            else:
                out = vocab_parallel_weighted_cross_entropy(x @ w.t(), labels, config)
            (out.loss * grad).sum().backward()
            paths[fused] = (out.loss.float(), x.grad.float(), main_grad if fused else w.grad.float())
        for name, got, expected in zip(("loss", "grad hidden", "grad weight"), paths[True],
                                       paths[False], strict=True):
            scale = float(expected.abs().max())
            worst[f"{entropy} {gradient} {name}"] = float((got - expected).abs().max()) / scale
bound = 2**-6  # a couple of bf16 ulps of the largest value
bad = {k: v for k, v in worst.items() if v > bound}
print("max |fused - unfused| / max|unfused|: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
raise SystemExit(1 if bad else 0)
EOF
}

bench() { # tool args...: prints the tool's goal lines as the detail
    local tool=$1
    shift
    "$PYTHON" "tools/$tool" --device cuda --out "$WORK/$tool.json" "$@" || return 1
    echo "wrote $WORK/$tool.json (kept in bench_out/ as well)"
    mkdir -p bench_out && cp "$WORK/$tool.json" "bench_out/gpu_${tool%.py}.json"
}

run_check "tiny model + data" make_inputs
# fp32 for the spec and TP comparisons (TE's kernels differ from the local ones in rounding
# only); bf16 for the fused path, compared with the unfused TE step on the same bf16 logits.
run_check "finetune local spec" finetune local 1 model.transformer_impl=local model.dtype=fp32
run_check "finetune TE spec" finetune te 1 model.transformer_impl=transformer_engine \
    model.dtype=fp32
run_check "TE loss = local loss" same_loss te local 1e-3
if [[ $GPUS -ge 2 ]]; then
    run_check "finetune TE TP2 (NCCL)" finetune te_tp2 2 model.transformer_impl=transformer_engine \
        model.dtype=fp32 parallel.tensor=2
    run_check "TP2 loss = TP1 loss" same_loss te_tp2 te 1e-4
else
    record "finetune TE TP2 (NCCL)" skipped 0 "needs 2 GPUs, found $GPUS"
fi
run_check "fused vs unfused (cuda)" fused_on_cuda
run_check "finetune TE bf16" finetune te_bf16 1 model.transformer_impl=transformer_engine \
    model.dtype=bf16
run_check "finetune TE bf16 fused" finetune te_fused 1 model.transformer_impl=transformer_engine \
    model.dtype=bf16 eaft.fused_output=true eaft.fused_chunk_tokens=24
run_check "fused loss = unfused" same_loss te_fused te_bf16 1e-3
run_check "finetune TE bf16 fused fwd" finetune te_fused_fwd 1 \
    model.transformer_impl=transformer_engine model.dtype=bf16 eaft.fused_output=true \
    eaft.fused_chunk_tokens=24 eaft.fused_gradient=forward
run_check "fused fwd loss = unfused" same_loss te_fused_fwd te_bf16 1e-3
run_check "bench_loss cuda bf16" bench bench_loss.py --dtype bf16 --tokens 4096 --vocab 151936 \
    --tp 1 --rounds 3
TP_BENCH=(1)
[[ $GPUS -ge 2 ]] && TP_BENCH=(1 2)
run_check "bench_fused cuda bf16" bench bench_fused.py --dtype bf16 --tokens 4096 \
    --vocab 151936 --hidden 2560 --tp "${TP_BENCH[@]}" --rounds 3

echo
echo "gpu_check summary ($GPUS GPU(s), Transformer Engine $TE)"
printf '%-26s %-7s %6s  %s\n' check status seconds detail
while IFS=$'\t' read -r name status seconds detail; do
    printf '%-26s %-7s %6s  %s\n' "$name" "$status" "$seconds" "$detail"
done <"$TABLE"
for log in "$WORK"/bench_*_cuda_bf16.log; do
    [[ -f $log ]] && { echo; grep -E '^(T=|  )' "$log" || true; }
done
if grep -q $'\tFAIL\t' "$TABLE"; then
    exit 1
fi
exit 0
