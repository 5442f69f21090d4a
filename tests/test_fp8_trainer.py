"""AMIR-GRPO steps with FP8 rollouts (``rollout.fp8_rollout``) on CPU, through every route the trainer hands weights to
an engine by: the embedded engine in process (start-up weights, then the bucketed stream each step), and an embedded
fleet server started from an FP8 seed directory (``launch.fleet_seed --hf``) updated through the bucketed broadcast and
the file snapshot in turn (one run: the check script switches the route after every rollout). tests/fp8_trainer_check.py runs the trainer and scores every rollout's log-probs
against two float64 transformers models: the trainer's weights quantized and dequantized as the FP8 route does, and
the trainer's weights as they are.

Expected: the engine samples from exactly the dequantized FP8 weights (float32 engine vs float64 reference: < 1e-5),
which differ from the trainer's own weights by a small bounded amount (the mismatch TIS corrects; on by default with
FP8 rollouts: algorithm.tis_cap 2.0). The bound: a weight is off by at most 2^-4 of its size (e4m3's half-ulp,
rollout/fp8.py), in practice about 2^-6 on average, so a token's log-prob moves by a few 1e-3 on average; on this
model the measured max is ~0.03 and the mean ~0.005, and the test allows max < 0.2, mean < 0.02, and needs max > 1e-3
(the old unquantized route gave the trainer's own weights: ~1e-6, tests/test_trainer.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import CONFIG, ROOT
from test_weight_broadcast import TOKEN
from test_weight_broadcast import _start as start_server

pytestmark = [pytest.mark.timeout(600)]
MODEL = ["model.hidden_size=128", "model.ffn_hidden_size=256", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_kv_heads=2"]
RUN = ["data.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=12", "train.micro_batch_size=8",
       "data.synthetic.num_train=200", "data.synthetic.num_test=16", "eval.max_problems=8", "eval.samples=2",
       "logging.progress=false", "logging.tensorboard=false", "train.lr=1e-3", "rollout.fp8_rollout=true",
       "rollout.weight_sync_bucket_mb=1"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def _train(run: Path, steps: int, *extra: str) -> tuple[list[dict], list[dict]]:
    """(rollout records of tests/fp8_trainer_check.py, metrics.jsonl rows) of a run of ``steps`` steps."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fp8_trainer_check.py"), str(CONFIG),
                           str(run / "check.json"), *MODEL, *RUN, f"train.steps={steps}", f"logging.dir={run}",
                           f"checkpoint.dir={run / 'ckpt'}", *extra], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run / "check.json").read_text())["rollouts"], rows


def _check(records: list[dict], rows: list[dict], steps: int) -> None:
    assert [r["version"] for r in records] == list(range(steps))  # one rollout per step, each after an update
    for r in records:
        assert r["max_vs_fp8"] < 1e-5, r  # the engine holds exactly the dequantized FP8 weights
        assert 1e-3 < r["max_vs_float"] < 0.2 and r["mean_vs_float"] < 0.02, r  # not the trainer's own weights
    assert [row["weight_version"] for row in rows] == list(range(1, steps + 1))
    for r, row in zip(records, rows):  # the trainer's own mismatch metric measures the same FP8 gap
        assert abs(row["mismatch/logp_abs_max"] - r["max_vs_float"]) < 1e-4, (row, r)
        assert "offpolicy/truncated_frac" in row  # TIS is on


def test_fp8_rollouts_on_the_embedded_engine(tmp_path):
    records, rows = _train(tmp_path / "run", 3)
    _check(records, rows, 3)
    assert "tis_cap: 2.0" in (tmp_path / "run" / "config.yaml").read_text()  # the default with FP8 rollouts


@pytest.mark.dist
def test_fp8_rollouts_through_an_embedded_fleet_file_and_broadcast(tmp_path):
    from launch.fleet_seed import write_seed_hf_dir

    seed = write_seed_hf_dir(str(CONFIG), tmp_path / "seed", [*MODEL, *RUN])
    assert json.loads((seed / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    server, url = start_server(seed, tmp_path, 0)  # an embedded server (megatron_amir.rollout.server)
    try:
        records, rows = _train(tmp_path / "run", 3, "--alternate-transport", "rollout.engine=remote",
                               f"rollout.servers=[{url}]", "rollout.use_router=false", "rollout.weight_sync=broadcast",
                               f"rollout.token={TOKEN}")
        assert [r["transport"] for r in records] == ["broadcast", "file", "broadcast"]
        _check(records, rows, 3)
    finally:
        server.kill()
        server.wait(10)
