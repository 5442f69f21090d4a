#!/usr/bin/env bash
# The embedded CPU demo, from a fresh machine: set up .venv, then warm-up -> GRPO vs AMIR-GRPO -> report.
# Usage: bash launch/demo.sh [--quick] [--out DIR] [--seed N] [--async-rollouts K]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
exec "${MEGATRON_AMIR_VENV:-$root/.venv}/bin/python" -m launch.demo "$@"
