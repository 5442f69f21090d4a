#!/usr/bin/env bash
# The checks only a GPU can do, prepared for the day one is lent: in order of risk, at most ~10 minutes on one
# H100 (a time budget cuts the later stages short), one line per stage.
#
# Usage: bash scripts/gpu_check.sh [--list] [STAGE ...]     (default: every stage, in table order)
# Environment:
#   MEGATRON_AMIR_PYTHON  the Python with CUDA torch, Transformer Engine and vLLM (default: .venv/bin/python)
#   GPU_CHECK_BUDGET_S    seconds for the whole run (default 570); a stage gets min(its limit, what is left)
#   GPU_CHECK_LOGS        directory of the per-stage logs (default: runs/gpu_check)
# Output: "gpu_check <stage> PASS|FAIL|SKIP <seconds>s [note]" per stage, then a summary line. Exit status 1 when a
# stage failed, else 0: on a machine without CUDA every stage is SKIP and the exit status is 0.
set -uo pipefail

# ---- the stages, in order of risk. One line each: name|limit in seconds|needs (cuda, te, vllm)|command, run with
# bash from the repository root with $PY set. Add a stage by adding a line; the last stage runs every `gpu`-marked
# test the earlier stages did not, so new GPU tests are included without touching this table.
STAGES=(
  "versions|45|cuda|\$PY -c 'import torch, megatron_amir.model.compat as c; assert c.apply_cpu_compat() is False, \"CPU layer active on GPU\"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"
  "te_fp8_step|150|cuda,te|\$PY -m pytest -q -x -m gpu tests/test_model_gpu.py"
  "vllm_engine|120|cuda,vllm|\$PY -m pytest -q -x -m gpu tests/test_rollout_vllm.py"
  "weight_sync_gpu|240|cuda|\$PY -m pytest -q -x -m gpu tests/test_weight_sync_gpu.py"
  "vllm_fleet|210|cuda,vllm|MEGATRON_AMIR_VLLM_PYTHON=\$PY MEGATRON_AMIR_VLLM_EXTRA_ARGS='--gpu-memory-utilization 0.3' \$PY -m pytest -q -x -m vllm tests/test_vllm_real.py -k 'processed_logprobs or collective_rpc or trainer'"
  "vllm_fp8|150|cuda,vllm|MEGATRON_AMIR_VLLM_PYTHON=\$PY MEGATRON_AMIR_VLLM_EXTRA_ARGS='--gpu-memory-utilization 0.3' \$PY -m pytest -q -x -m gpu tests/test_gpu_fp8_rollout.py"
  "nccl_one_gpu|60|cuda|\$PY -m pytest -q -x -m gpu tests/test_dist_env.py"
  "pytest_gpu|150|cuda|\$PY -m pytest -q -m gpu tests --ignore=tests/test_model_gpu.py --ignore=tests/test_rollout_vllm.py --ignore=tests/test_dist_env.py --ignore=tests/test_gpu_fp8_rollout.py --ignore=tests/test_weight_sync_gpu.py"
)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
export PY=${MEGATRON_AMIR_PYTHON:-$root/.venv/bin/python}
budget=${GPU_CHECK_BUDGET_S:-570}
logs=${GPU_CHECK_LOGS:-$root/runs/gpu_check}

if [ "${1:-}" = "--list" ]; then
  for s in "${STAGES[@]}"; do echo "${s%%|*}"; done
  exit 0
fi
wanted=" $* "

# what this machine has (each probe bounded: a broken driver can hang an import)
probe() { timeout 120 "$PY" -c "$1" >/dev/null 2>&1; }
have_cuda=0 have_te=0 have_vllm=0 no_cuda="no CUDA device visible to $PY"
[ -x "$PY" ] || no_cuda="no Python at $PY"
if [ -x "$PY" ] && probe "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  have_cuda=1
  probe "import transformer_engine.pytorch" && have_te=1
  probe "import vllm" && have_vllm=1
fi

mkdir -p "$logs"
start=$(date +%s)
failed=0 passed=0 skipped=0
printf 'gpu_check: %d stages, budget %ss, python %s, logs %s\n' "${#STAGES[@]}" "$budget" "$PY" "$logs"
for s in "${STAGES[@]}"; do
  IFS='|' read -r name limit needs cmd <<<"$s"
  if [ "$wanted" != "  " ] && [[ "$wanted" != *" $name "* ]]; then continue; fi
  reason=""
  case ",$needs," in *,cuda,*) [ "$have_cuda" = 1 ] || reason=$no_cuda ;; esac
  if [ -z "$reason" ]; then
    case ",$needs," in *,te,*) [ "$have_te" = 1 ] || reason="transformer_engine does not import" ;; esac
    case ",$needs," in *,vllm,*) [ "$have_vllm" = 1 ] || reason="vllm does not import" ;; esac
  fi
  left=$((budget - ($(date +%s) - start)))
  if [ -z "$reason" ] && [ "$left" -lt 20 ]; then reason="out of time (budget ${budget}s)"; fi
  if [ -n "$reason" ]; then
    printf 'gpu_check %-14s SKIP %4ss  %s\n' "$name" 0 "$reason"
    skipped=$((skipped + 1))
    continue
  fi
  t0=$(date +%s)
  timeout --kill-after=15 "$((limit < left ? limit : left))" bash -c "$cmd" >"$logs/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  if [ "$rc" = 0 ]; then
    printf 'gpu_check %-14s PASS %4ss\n' "$name" "$dt"
    passed=$((passed + 1))
  else
    note="exit $rc"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="timed out"; fi
    printf 'gpu_check %-14s FAIL %4ss  %s; last line: %s\n' "$name" "$dt" "$note" "$(tail -n 1 "$logs/$name.log")"
    failed=$((failed + 1))
  fi
done
printf 'gpu_check: %d passed, %d failed, %d skipped in %ss\n' "$passed" "$failed" "$skipped" "$(($(date +%s) - start))"
[ "$failed" = 0 ]
