#!/usr/bin/env bash
# Set up (idempotently) and run the test suite: everything but `gpu` tests on CPU machines.
# Usage: bash tests/run.sh [extra pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh --with-slurm
marker="not gpu"
py=${MEGATRON_AMIR_VENV:-$root/.venv}/bin/python
if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then marker=""; fi
set +e
"$py" -m pytest -ra -q ${marker:+-m "$marker"} "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests (exit 5): treating as a failure" >&2
  exit 1
fi
exit "$rc"
