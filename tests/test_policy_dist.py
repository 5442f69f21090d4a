"""One RL train step at TP=2, PP=2 and DP=2 equals TP=PP=DP=1 (same init, same batch); resharded loads.

Four torchrun launches (gloo, CPU) of tests/dist/policy_worker.py share one module-scoped directory:
  ref  (1 process, TP=PP=1): saves the initial model, steps, records loss / grad norm / params / log-probs
  tp2  (TP=2): loads the initial model, same step; saves its stepped model (TP=2 checkpoint)
  pp2  (PP=2): same step; then loads the TP=2 checkpoint at PP=2 and records log-probs
  dp2  (DP=2, TP=1): same step, each rank on its own groups; then loads the TP=2 checkpoint at TP=1
  ref_tied / pp2_tied: the same with tied input/output embeddings, PP=2 against TP=PP=1
  dp2_distopt: DP=2 with the DistributedOptimizer
The loss is the real algorithms.prepare_batch + micro_batch_loss (GRPO + AMIR pair term), 4 micro-batches
per step at DP=1 and 2 per rank at DP=2, so equal grad norms show that micro-batch and DP losses are
summed, not averaged (Adam's update alone would hide a constant gradient scale).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.spawn_helpers import torchrun_worker

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "policy_worker.py"
TOL = 1e-5


def _torchrun(nproc: int, *args: str) -> None:
    torchrun_worker(WORKER, nproc, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_dist")
    _torchrun(1, "ref", "--out", str(out), "--name", "ref")
    _torchrun(2, "step", "--tp", "2", "--name", "tp2", "--out", str(out), "--save-after", str(out / "tp2ckpt"))
    _torchrun(2, "step", "--pp", "2", "--name", "pp2", "--out", str(out), "--load-after", str(out / "tp2ckpt"))
    _torchrun(2, "step", "--name", "dp2", "--out", str(out), "--load-after", str(out / "tp2ckpt"))
    # tied input/output embeddings split over two pipeline stages (Megatron keeps a copy on the last stage)
    _torchrun(1, "ref", "--tied", "--init", "init_tied", "--out", str(out), "--name", "ref_tied")
    _torchrun(2, "step", "--tied", "--pp", "2", "--init", "init_tied", "--name", "pp2_tied", "--out", str(out))
    # DP=2 with Megatron's DistributedOptimizer (optimizer state sharded over DP, params all-gathered)
    _torchrun(2, "step", "--dist-opt", "--name", "dp2_distopt", "--out", str(out))
    names = ("ref", "tp2", "pp2", "dp2", "ref_tied", "pp2_tied", "dp2_distopt")
    return {n: torch.load(out / f"{n}.pt", weights_only=True) for n in names}


def _maxdiff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "pp2_tied", "dp2_distopt"])
def test_step_matches_single_process(runs, layout):
    ref, got = runs["ref_tied" if layout.endswith("_tied") else "ref"], runs[layout]
    assert got["world"] == 2 and ref["world"] == 1
    # same starting model (loaded from the TP=1 save) -> same log-probs
    assert float((got["init_logp"] - ref["init_logp"]).abs().max()) < TOL
    rm, gm = ref["metrics"], got["metrics"]
    assert abs(rm["loss"] - gm["loss"]) < TOL, (rm["loss"], gm["loss"])
    assert rm["loss"] != 0.0
    # grad norm is scale-sensitive: equality rules out a 1/num_microbatches or 1/DP factor
    assert abs(rm["grad_norm"] - gm["grad_norm"]) < TOL * max(1.0, rm["grad_norm"]), (rm["grad_norm"], gm["grad_norm"])
    assert rm["num_microbatches"] == gm["num_microbatches"] == 4
    for k in ("pg_loss", "pair_term", "num_tokens", "entropy", "clip_frac_low", "ratio_mean"):
        assert abs(rm[k] - gm[k]) < TOL, (k, rm[k], gm[k])
    # updated parameters (TP/PP-gathered on rank 0) agree, and they really moved
    assert _maxdiff(ref["params"], got["params"]) < TOL
    assert float((ref["after_logp"] - ref["init_logp"]).abs().max()) > 1e-4
    assert float((got["after_logp"] - ref["after_logp"]).abs().max()) < TOL


@pytest.mark.parametrize("layout", ["pp2", "dp2"])
def test_tp2_checkpoint_loads_resharded(runs, layout):
    """Saved at TP=2 after its step; loaded at PP=2 (TP=1) and at TP=1 (DP=2): same log-probs."""
    saved_logp = runs["tp2"]["after_logp"]
    loaded = runs[layout]["loaded_logp"]
    assert loaded.shape == saved_logp.shape
    assert float((loaded - saved_logp).abs().max()) < TOL
