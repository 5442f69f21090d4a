"""scripts/gpu_check.sh on a machine without a GPU: parses (bash -n), lists its stages in table order, prints one
SKIP line per stage naming the reason and exits 0; an unknown Python is a SKIP too, never a failure."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.timeout(300)


def _run(*args, env=None):
    import os

    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})


def test_bash_n_and_stage_list():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    names = _run("--list").stdout.split()
    assert names[:2] == ["versions", "te_fp8_step"] and names[-1] == "pytest_gpu"
    assert {"vllm_engine", "weight_sync_gpu", "vllm_fleet", "vllm_fp8", "nccl_one_gpu"} <= set(names)
    # the last stage runs every gpu-marked test, so GPU tests added later are part of the check
    assert "-m gpu tests " in SCRIPT.read_text().split('"pytest_gpu|', 1)[1].split("\n", 1)[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_without_gpu_every_stage_skips_and_exits_0(tmp_path):
    names = _run("--list").stdout.split()
    out = _run(env={"GPU_CHECK_LOGS": str(tmp_path), "MEGATRON_AMIR_PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("gpu_check ")]
    assert [ln.split()[1] for ln in lines] == names
    assert all(ln.split()[2] == "SKIP" and "no CUDA device" in ln for ln in lines), lines
    assert out.stdout.splitlines()[-1].startswith(f"gpu_check: 0 passed, 0 failed, {len(names)} skipped")
    # a Python that does not exist: still SKIP lines and exit 0
    out = _run("versions", env={"GPU_CHECK_LOGS": str(tmp_path), "MEGATRON_AMIR_PYTHON": str(tmp_path / "nope")})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("gpu_check ")]
    assert out.returncode == 0 and len(lines) == 1 and lines[0].split()[1:3] == ["versions", "SKIP"], out.stdout
    assert "no Python at" in lines[0]
