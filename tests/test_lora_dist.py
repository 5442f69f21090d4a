"""LoRA at TP=2, PP=2 and DP=2 with the DistributedOptimizer equals TP=PP=1 (tests/dist/lora_worker.py).

Every layout loads the same initial model (adapters with random B, saved by the TP=PP=1 run) and takes one RL
step (GRPO + AMIR pair term, 4 micro-batches): loss, adapter gradients (TP/PP-gathered), gradient norm and the
updated adapters must agree within 1e-5, and the frozen base must come out of the step bit for bit unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.spawn_helpers import torchrun_worker

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).resolve().parent / "dist" / "lora_worker.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_dist")
    torchrun_worker(WORKER, 1, "ref", "--out", str(out), "--name", "ref")
    torchrun_worker(WORKER, 2, "step", "--tp", "2", "--name", "tp2", "--out", str(out))
    torchrun_worker(WORKER, 2, "step", "--pp", "2", "--name", "pp2", "--out", str(out))
    torchrun_worker(WORKER, 2, "step", "--dist-opt", "--name", "dp2_distopt", "--out", str(out))
    return {n: torch.load(out / f"{n}.pt", weights_only=True) for n in ("ref", "tp2", "pp2", "dp2_distopt")}


def _maxdiff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2_distopt"])
def test_lora_step_matches_single_process(runs, layout):
    ref, got = runs["ref"], runs[layout]
    assert ref["world"] == 1 and got["world"] == 2
    assert float((got["init_logp"] - ref["init_logp"]).abs().max()) < TOL
    assert float((got["base_logp"] - ref["base_logp"]).abs().max()) < TOL
    assert float((ref["init_logp"] - ref["base_logp"]).abs().max()) > 1e-3  # the adapters matter
    rm, gm = ref["metrics"], got["metrics"]
    assert rm["loss"] != 0.0 and abs(rm["loss"] - gm["loss"]) < TOL, (rm["loss"], gm["loss"])
    assert abs(rm["grad_norm"] - gm["grad_norm"]) < TOL * max(1.0, rm["grad_norm"]), (rm["grad_norm"], gm["grad_norm"])
    if got["grads"] is not None:
        assert len(ref["grads"]) == 2 * 4 * 2  # A and B of 4 modules in 2 layers
        assert _maxdiff(ref["grads"], got["grads"]) < TOL
        assert min(float(g.abs().max()) for g in ref["grads"].values()) > 0
    adapters = {k for k in ref["params"] if ".lora_" in k}
    pick = lambda d, keep: {k: v for k, v in d.items() if (k in adapters) == keep}  # noqa: E731
    assert _maxdiff(pick(ref["params"], True), pick(got["params"], True)) < TOL
    assert _maxdiff(pick(ref["params"], True), pick(ref["before"], True)) > 1e-4  # the adapters moved
    assert float((got["after_logp"] - ref["after_logp"]).abs().max()) < TOL


@pytest.mark.parametrize("layout", ["ref", "tp2", "pp2", "dp2_distopt"])
def test_base_unchanged_bit_for_bit(runs, layout):
    run = runs[layout]
    base = [k for k in run["params"] if ".lora_" not in k]
    assert base and all(torch.equal(run["params"][k], run["before"][k]) for k in base)
