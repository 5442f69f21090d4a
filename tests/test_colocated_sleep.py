"""rollout.vllm_sleep_level: the trainer puts its colocated engine to sleep for the training phase and wakes it in
the order sleep mode needs (weights, the update into them, then the KV cache). On CPU the engine is the embedded
stand-in with vLLM's sleep semantics (tests/colocated_sleep_check.py; vLLM's own sleep mode needs CUDA, see
tests/test_weight_sync_gpu.py): runs with sleep level 1 and 2 give the same metrics and final weights as a run
without sleep, bit for bit, the engine held less while asleep, and after every update its greedy output equals
transformers' on the pushed tensors. The config refuses sleep without a colocated vLLM and with async rollouts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_amir.config import ConfigError, load_config
from test_trainer import TINY as TRAINER_TINY  # pytest puts tests/ on sys.path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_tiny.yaml"
TINY = [*TRAINER_TINY, "eval.interval=0", "checkpoint.save_interval=1000", "model.tie_word_embeddings=false",
        "rollout.engine=vllm", "reward.name=varied_reward:by_hash", "train.steps=3"]
TIMING = ("time/", "throughput/")


def _run(tmp: Path, level: int) -> tuple[list[dict], dict, dict]:
    from safetensors.torch import load_file

    run = tmp / f"level{level}"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(tmp)])}
    cmd = [sys.executable, str(ROOT / "tests" / "colocated_sleep_check.py"), str(CONFIG), str(run / "check.json"),
           "--stand-in", *TINY, f"rollout.vllm_sleep_level={level}", f"logging.dir={run}",
           f"checkpoint.dir={run / 'ckpt'}"]
    res = subprocess.run(cmd, env=env, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]
    return rows, json.loads((run / "check.json").read_text()), load_file(run / "weights.safetensors")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sleep_levels_give_the_run_without_sleep_bit_for_bit(tmp_path):
    import torch

    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "varied_reward.py").write_text(  # varies inside every group, so every update moves the weights
        "import zlib\n\n\ndef by_hash(responses, answers):\n"
        "    return [float(zlib.crc32(r.encode()) % 2) for r in responses]\n")
    with ThreadPoolExecutor(3) as pool:  # three one-thread trainer processes side by side: start-up dominates each
        runs = dict(zip((0, 1, 2), pool.map(lambda level: _run(tmp_path, level), (0, 1, 2))))
    base_rows, base, base_w = runs[0]
    assert [r["step"] for r in base_rows] == [1, 2, 3] and len(base["probes"]) == 2
    assert "sleep(1)" not in base["calls"] and base["memory"] == []
    assert base_rows[-1]["grad_norm"] > 0  # the weights move, so a lost or stale update would show
    for level in (1, 2):
        rows, check, weights = runs[level]
        assert rows == base_rows, level
        assert weights.keys() == base_w.keys() and all(torch.equal(weights[k], base_w[k]) for k in weights)
        # per step: rollouts, sleep, training, then weights awake -> update -> KV cache awake, before the next one
        want = [c for v in (1, 2, 3)
                for c in ("generate", f"sleep({level})", "wake_up(weights)", f"load({v})", "wake_up(kv_cache)")]
        assert check["calls"] == want, check["calls"]
        assert len(check["memory"]) == 3 and all(after < before for before, after in check["memory"]), check["memory"]
        assert all(p["engine"] == p["trainer"] for p in check["probes"]) and len(check["probes"]) == 2


def test_config_refuses_sleep_without_colocated_vllm_or_with_async_rollouts():
    ok = load_config(CONFIG, ["rollout.engine=vllm", "rollout.vllm_sleep_level=2"])
    assert ok.rollout.vllm_sleep_level == 2 and load_config(CONFIG, []).rollout.vllm_sleep_level == 0
    with pytest.raises(ConfigError, match="rollout.vllm_sleep_level.*needs engine=vllm"):
        load_config(CONFIG, ["rollout.vllm_sleep_level=1"])
    with pytest.raises(ConfigError, match="rollout.vllm_sleep_level.*async_off_policy"):
        load_config(CONFIG, ["rollout.engine=vllm", "rollout.vllm_sleep_level=1", "rollout.async_off_policy=true",
                             "algorithm.tis_cap=2.0"])
    with pytest.raises(ConfigError, match="vllm_sleep_level"):
        load_config(CONFIG, ["rollout.engine=vllm", "rollout.vllm_sleep_level=3"])
