#!/usr/bin/env bash
# Create or refresh the project's virtualenv (.venv) and install the CPU development set.
# Idempotent: a stamp holding the hash of the inputs makes a second run take ~1 s.
# Usage: bash scripts/bootstrap.sh [--with-slurm]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${MEGATRON_AMIR_VENV:-$root/.venv}
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.megatron-amir-stamp"
want=$(cat scripts/constraints-cpu.txt pyproject.toml setup.py scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing the CPU development set into $venv (first run: a few minutes)"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install -U "pip>=24"
  # megatron-core 0.19.2 declares Requires-Python>=3.12 but ships a working cp311 wheel (docs/megatron_on_cpu.md);
  # numpy<2.4 keeps pip on wheels. Never install the transformer-engine meta package on CPU.
  "${pip[@]}" install --ignore-requires-python --prefer-binary -c scripts/constraints-cpu.txt \
    torch numpy megatron-core
  "${pip[@]}" install --ignore-requires-python --prefer-binary -c scripts/constraints-cpu.txt \
    -e ".[test]"
  echo "$want" > "$stamp"
else
  echo "[bootstrap] $venv is up to date"
fi

if [ "${1:-}" = "--with-slurm" ]; then
  # Slurm + munge for the `slurm` tests (tests/slurm_harness.py starts its own cluster from them). Any
  # problem here only means those tests skip with the reason; it never fails the bootstrap.
  slurm_pkgs=(slurmctld slurmd slurm-client munge)
  if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
      echo "[bootstrap] not root: skipping the Slurm install (slurm tests will skip)"
    elif ! command -v apt-get >/dev/null 2>&1; then
      echo "[bootstrap] no apt-get: skipping the Slurm install (slurm tests will skip)"
    else
      echo "[bootstrap] installing ${slurm_pkgs[*]} with apt"
      export DEBIAN_FRONTEND=noninteractive
      if ! apt-get install -y -q --no-install-recommends "${slurm_pkgs[@]}" >/dev/null 2>&1; then
        # stale package lists: refresh once and retry
        if ! { apt-get update -q >/dev/null 2>&1 \
               && apt-get install -y -q --no-install-recommends "${slurm_pkgs[@]}" >/dev/null; }; then
          echo "[bootstrap] apt-get could not install ${slurm_pkgs[*]} (slurm tests will skip)"
        fi
      fi
    fi
  fi
fi
