"""Packages import one way: launch/ -> megatron_amir/ <- checkpoints_tools/ ([tool.importlinter] in
pyproject.toml, checked by import-linter's `lint-imports`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(*args: str) -> subprocess.CompletedProcess:
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} missing: pip install -e '.[test]' installs import-linter"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's packages, not another installed copy
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_are_kept():
    res = _lint_imports()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in res.stdout, res.stdout[-2000:]


def test_a_broken_contract_fails(tmp_path):
    """The check sees this tree's real imports: a contract the code breaks (launch imports the library) fails,
    naming the import."""
    cfg = tmp_path / "contracts.toml"
    cfg.write_text('[tool.importlinter]\nroot_packages = ["megatron_amir", "launch"]\n\n'
                   '[[tool.importlinter.contracts]]\nname = "launch without the library"\ntype = "forbidden"\n'
                   'source_modules = ["launch.dist_env"]\nforbidden_modules = ["megatron_amir"]\n')
    res = _lint_imports("--config", str(cfg))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "launch.dist_env -> megatron_amir.training.dist_env" in res.stdout, res.stdout[-2000:]
