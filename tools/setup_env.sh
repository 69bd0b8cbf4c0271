#!/usr/bin/env bash
# Creates .venv (Python 3.12, the locked versions of uv.lock) on a fresh machine.
# `setup_env.sh envs/nemo-2.7` (or envs/nemo-2.6) creates that folder's .venv instead: a NeMo 2
# stack from its own uv.lock.
# Python: $PYTHON if set, else pyenv's newest 3.12, else python3.12 on PATH.
# uv: on PATH, else installed into .tools/uv with pip from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    local root version
    root=$(pyenv root)
    version=$(find "$root/versions" -maxdepth 1 -name '3.12.*' -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
    if [[ -n "$version" && -x "$root/versions/$version/bin/python3.12" ]]; then
      echo "$root/versions/$version/bin/python3.12"; return
    fi
  fi
  if command -v python3.12 >/dev/null 2>&1; then command -v python3.12; return; fi
  echo "error: Python 3.12 not found (megatron-core >= 0.17 needs it); set PYTHON=/path/to/python3.12" >&2
  exit 1
}

python=$(find_python)
if uv --version >/dev/null 2>&1; then  # a pyenv shim is on PATH but may not run
  uv=uv
else
  if [[ ! -x .tools/uv/bin/uv ]]; then
    "$python" -m venv .tools/uv
    .tools/uv/bin/python -m pip install --quiet --disable-pip-version-check "uv>=0.5"
  fi
  uv=.tools/uv/bin/uv
fi
if [[ -n "${1:-}" ]]; then
  # NeMo 2 (nemo-toolkit 2.6/2.7) runs on Megatron-Core 0.15, below the main environment's
  # floor: a project and lock of its own; megatron_eaft comes from the checkout on PYTHONPATH.
  if [[ ! -f "$1/uv.lock" ]]; then
    echo "error: $1/uv.lock not found (the environments are envs/nemo-2.6 and envs/nemo-2.7)" >&2
    exit 1
  fi
  "$uv" sync --locked --project "$1" --compile-bytecode --python "$python"
  exit 0
fi
# The CPU test/demo environment: everything CI runs (the Megatron-Bridge adapter's tests,
# and lm-evaluation-harness and wandb for the evaluate and W&B tests), from the lock file,
# nothing newer. Bytecode is compiled once here: every rank, worker and test process imports
# megatron, and where PYTHONDONTWRITEBYTECODE is set (as on these machines) each import would
# otherwise compile it again (measured: ~19 s -> ~10 s).
"$uv" sync --locked --extra dev --extra bridge --extra eval --extra wandb --compile-bytecode --python "$python"
