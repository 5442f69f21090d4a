"""launch/fleet_member.py: discovery-file registration under concurrency, and the wrapper's life cycle
(register once healthy, unregister on SIGUSR2 / SIGTERM, exit codes) around a real HTTP server process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from multiprocessing import get_context
from pathlib import Path

import pytest

from launch.fleet_member import read_discovery_file, register, unregister

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "slurm_standin_server.py"


def _register_many(path: str, start: int, n: int) -> None:
    for i in range(start, start + n):
        register(path, f"http://10.0.0.{i}:8000")


def test_concurrent_writers_lose_nothing(tmp_path):
    disc = tmp_path / "fleet" / "servers.txt"
    ctx = get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(str(disc), 10 * k, 10)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    urls = read_discovery_file(disc)
    assert sorted(urls) == sorted(f"http://10.0.0.{i}:8000" for k in range(4) for i in range(10 * k, 10 * k + 10))
    register(disc, urls[0])  # idempotent
    assert len(read_discovery_file(disc)) == 40
    for u in urls[:35]:
        unregister(disc, u)
    unregister(disc, "http://not-there:1")
    assert read_discovery_file(disc) == urls[35:]
    # the rollout client's reader understands the same file
    from megatron_amir.rollout.router import read_discovery_file as client_reader

    assert client_reader(disc) == urls[35:]


def _member(disc: Path, *cmd: str, extra=()) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launch.fleet_member", "--discovery-file", str(disc), "--host", "127.0.0.1",
         *extra, "--", *cmd],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_listed(disc: Path, proc: subprocess.Popen, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        urls = read_discovery_file(disc)
        if urls:
            return urls[0]
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    raise AssertionError("server never registered")


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_registers_when_healthy_and_unregisters_on_stop(tmp_path, sig):
    disc = tmp_path / "servers.txt"
    proc = _member(disc, sys.executable, str(SERVER), "{port}")
    url = _wait_listed(disc, proc)
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        assert r.status == 200
    proc.send_signal(signal.SIGUSR1)  # preemption warnings are ignored by the fleet
    time.sleep(0.5)
    assert proc.poll() is None and read_discovery_file(disc) == [url]
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert read_discovery_file(disc) == []
    with pytest.raises(OSError):  # the server is gone too
        urllib.request.urlopen(url + "/health", timeout=2)


def test_server_that_dies_is_never_listed_and_its_code_is_returned(tmp_path):
    disc = tmp_path / "servers.txt"
    proc = _member(disc, sys.executable, "-c", "import sys; sys.exit(3)")
    proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert read_discovery_file(disc) == []


def test_server_that_never_gets_healthy_times_out(tmp_path):
    disc = tmp_path / "servers.txt"
    proc = _member(disc, sys.executable, "-c", "import time; time.sleep(60)", extra=["--ready-timeout", "1"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "not healthy" in out
    assert read_discovery_file(disc) == []


def test_server_that_loses_its_port_is_started_again_on_another(tmp_path):
    """The port is probed here and bound by the server later (minutes for vLLM): if another process took it and
    the server exits before it is healthy, the wrapper starts it again on a fresh port."""
    disc, marker = tmp_path / "servers.txt", tmp_path / "first-attempt-done"
    script = (f"import os, sys, runpy\nm = {str(marker)!r}\n"
              "if not os.path.exists(m):\n    open(m, 'w').close(); sys.exit(98)  # EADDRINUSE-like failure\n"
              f"sys.argv = [{str(SERVER)!r}, sys.argv[1]]\nrunpy.run_path({str(SERVER)!r}, run_name='__main__')\n")
    (tmp_path / "flaky.py").write_text(script)
    proc = _member(disc, sys.executable, str(tmp_path / "flaky.py"), "{port}")
    url = _wait_listed(disc, proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "starting it again on another port (1/3)" in out and url.startswith("http://")


def test_slurm_fleet_step_for_vllm_members(tmp_path):
    """slurm/common.sh amir_start_fleet: a vLLM member is started through fleet_member --vllm-model, and its
    srun step pins the tensor-parallel GPUs and the fleet component's CPUs per task (srun >= 22.05 inherits
    no --cpus-per-task); the embedded member's step is left as it was."""
    disc = tmp_path / "d.txt"
    script = (f"set -euo pipefail; source {ROOT}/slurm/common.sh; srun() {{ echo \"SRUN $*\"; }}; "
              f"amir_log() {{ :; }}; AMIR_SRUN_ARGS=(); AMIR_JOB_DIR={tmp_path}; AMIR_PY=py; "
              f"SLURM_CPUS_PER_TASK_HET_GROUP_1=6 MEGATRON_AMIR_VLLM_TP=2 amir_start_fleet {disc} /m --het-group=1; "
              "wait; "
              f"MEGATRON_AMIR_FLEET_ENGINE=embedded SLURM_CPUS_PER_TASK=3 amir_start_fleet {disc} /m; wait")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGATRON_AMIR_"))}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    vllm_line, embedded_line = [line.split() for line in out.splitlines() if line.startswith("SRUN ")]
    assert vllm_line[:4] == ["SRUN", "--het-group=1", "--gpus-per-task=2", "--cpus-per-task=6"]
    member = vllm_line[vllm_line.index("launch.fleet_member"):]
    assert member[member.index("--vllm-model") + 1] == "/m" and member[-2:] == ["--tensor-parallel-size", "2"]
    assert not any(a.startswith(("--gpus-per-task", "--cpus-per-task")) for a in embedded_line)
    assert "megatron_amir.rollout.server" in embedded_line


def test_fleet_seed_hf_dir_has_the_trainers_vocabulary(tmp_path):
    """launch.fleet_seed --hf: the HF directory vLLM members serve has the trainer's rollout config (its vocab_size
    is the tokenizer's, so the trainer's updates fit it), weights with that many rows, and no generation_config.json
    (whose sampling defaults vLLM would apply to our requests)."""
    import json

    from safetensors import safe_open

    from launch.fleet_seed import main, rollout_hf_config_of
    from megatron_amir.config import load_config

    config = str(ROOT / "configs" / "demo_tiny.yaml")
    assert main(["--hf", config, str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == rollout_hf_config_of(load_config(config, []))["vocab_size"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == cfg["vocab_size"]
