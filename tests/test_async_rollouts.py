"""Asynchronous rollouts: the producer's schedule and staleness bound (fake engine), and the trainer end to end on
CPU (k = 0 is the synchronous run bit for bit; k = 1, 2 never train on a sample older than k; kill + resume in the
middle of an async run gives the uninterrupted run's metrics)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_amir.training.async_rollouts import (ProducedBatch, RolloutProducer, load_in_flight,
                                                   off_policy_metrics, save_in_flight)
from megatron_amir.training.rollout_batch import build_rollout_batch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_tiny.yaml"


# ---------------------------------------------------------------------------------------------- producer (fast)
class _Engine:
    """Records which weights version each generation ran with."""

    def __init__(self, version=0):
        self.version, self.loads = version, []

    def load_weights(self, weights, version):
        assert weights["w"].item() == version  # the weights published as that version, not a fresher copy
        self.version = version
        self.loads.append(version)


def _batch(version: int):
    return build_rollout_batch([[1, 2]], [[3]], [[-0.5]], [0], [1.0], [True], [False], [version], pad_id=0)


def _producer(engine, k, first=0, last=8, restored=(), log=None, slow=0.0):
    log = [] if log is None else log
    cursor = {"pos": first}

    def generate(step):
        time.sleep(slow)
        log.append((step, engine.version))
        cursor["pos"] += 1
        return _batch(engine.version), {"rollout/step": float(step)}

    return RolloutProducer(engine, generate, lambda: dict(cursor), max_staleness=k, first_step=first, last_step=last,
                           version=first, weights={"w": torch.tensor(float(first))}, restored=restored), log


@pytest.mark.parametrize("k", [0, 1, 2])
def test_producer_follows_the_schedule_and_never_exceeds_the_bound(k):
    """The batch of step s is sampled with version max(0, s - k) exactly: no fresher one even when published (that
    would make the run depend on timing) and never an older one (staleness t - version <= k at training time)."""
    engine = _Engine()
    producer, log = _producer(engine, k)
    try:
        for t in range(8):
            pb, _ = producer.get(t)
            assert pb.step == t and pb.metrics["rollout/step"] == t
            assert 0 <= t - int(pb.batch.weight_version.min()) <= k
            producer.publish(t + 1, {"w": torch.tensor(float(t + 1))})  # "train", then publish
    finally:
        producer.close()
    assert log == [(s, max(0, s - k)) for s in range(8)]


def test_producer_runs_ahead_by_k_batches_while_the_trainer_trains():
    """With k = 2, before the trainer publishes anything the producer has generated batches 0, 1, 2 (version 0) and
    waits for version 1 (batch 3); a published version lets exactly one more batch start."""
    engine = _Engine()
    producer, log = _producer(engine, 2)
    try:
        deadline = time.time() + 30
        while len(log) < 3 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert log == [(0, 0), (1, 0), (2, 0)]
        producer.publish(1, {"w": torch.tensor(1.0)})
        producer.get(0)
        while len(log) < 4 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert log[3:] == [(3, 1)]
    finally:
        producer.close()


def test_in_flight_waits_for_the_batches_a_resume_could_not_regenerate(tmp_path):
    """After step t (version t + 1 published) the batches t + 1 .. t + k were sampled with older weights: in_flight
    returns exactly those (waiting for them); saved and restored, a new producer serves them first and continues
    with the same schedule from the resumed version."""
    engine = _Engine()
    producer, _ = _producer(engine, 2, slow=0.05)
    try:
        for t in range(3):
            producer.get(t)
            producer.publish(t + 1, {"w": torch.tensor(float(t + 1))})
        pending = producer.in_flight(3)  # after steps 0..2: version 3 is the checkpoint's, step 3 comes next
        assert [b.step for b in pending] == [3, 4]
        assert [int(b.batch.weight_version[0]) for b in pending] == [1, 2]
    finally:
        producer.close()
    save_in_flight(tmp_path / "f.pt", pending, max_staleness=2)
    restored = load_in_flight(tmp_path / "f.pt", max_staleness=2)
    assert [(b.step, b.sampler_state, b.metrics) for b in restored] == [(b.step, b.sampler_state, b.metrics)
                                                                        for b in pending]
    assert torch.equal(restored[1].batch.tokens, pending[1].batch.tokens)
    with pytest.raises(ValueError, match="saved with rollout.max_staleness=2, this run has 1"):
        load_in_flight(tmp_path / "f.pt", max_staleness=1)
    assert load_in_flight(tmp_path / "missing.pt", max_staleness=2) == []

    engine = _Engine(version=3)
    resumed, log = _producer(engine, 2, first=3, restored=restored)
    try:
        assert [int(resumed.get(s)[0].batch.weight_version[0]) for s in (3, 4)] == [1, 2]
        assert int(resumed.get(5)[0].batch.weight_version[0]) == 3  # need(5) = 5 - 2: regenerated
    finally:
        resumed.close()
    assert log[0] == (5, 3)


def test_producer_errors_reach_the_trainer_and_eval_borrows_the_latest_weights():
    engine = _Engine()
    producer, _ = _producer(engine, 1)
    try:
        producer.get(0)
        producer.publish(1, {"w": torch.tensor(1.0)})
        with producer.engine() as e:  # evaluation runs with the current weights, between two batches
            assert e is engine and e.version == 1
    finally:
        producer.close()

    def broken(step):
        raise ValueError("verifier crashed")

    bad = RolloutProducer(_Engine(), broken, dict, max_staleness=1, first_step=0, last_step=4, version=0,
                          weights={"w": torch.tensor(0.0)})
    with pytest.raises(RuntimeError, match="rollout producer failed.*verifier crashed"):
        bad.get(0)
    bad.close()
    # a resume that lost a batch stops with the step instead of waiting forever
    engine = _Engine(version=3)
    gap, _ = _producer(engine, 2, first=3, restored=[ProducedBatch(4, _batch(2), {}, {})])
    try:
        with pytest.raises(RuntimeError, match="rollout batch of step 3 was neither restored"):
            gap.get(3)
    finally:
        gap.close()


def test_off_policy_ratio_statistics_against_float64():
    prox = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    behav = torch.tensor([[-1.5, -2.0, -0.1], [-0.1, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = [torch.exp(torch.tensor(x, dtype=torch.float64)).item() for x in (0.5, 0.0, -0.4, 0.0, -2.0)]
    got = off_policy_metrics(prox, behav, mask, cap=1.2)
    assert got["offpolicy/ratio_mean"] == pytest.approx(sum(r) / 5, rel=1e-6)
    assert got["offpolicy/ratio_max"] == pytest.approx(max(r), rel=1e-6)
    assert got["offpolicy/ratio_min"] == pytest.approx(min(r), rel=1e-6)
    assert got["offpolicy/truncated_frac"] == pytest.approx(1 / 5)


# ---------------------------------------------------------------------------------------------- trainer (slow)
TINY = [
    "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=2",
    "model.num_kv_heads=1", "data.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=12",
    "train.micro_batch_size=8", "data.synthetic.num_train=200", "data.synthetic.num_test=16",
    "logging.progress=false", "logging.tensorboard=false", "train.lr=1e-2", "algorithm.tis_cap=2.0",
    "reward.name=varied_reward:by_parity", "checkpoint.save_interval=1",
]
TIMING = ("time/", "throughput/")


def _async(k):
    return ["rollout.async_off_policy=true", f"rollout.max_staleness={k}"]


@pytest.fixture
def env(tmp_path):
    # a reward that varies inside every group (the tiny random model solves nothing), so the policy moves
    (tmp_path / "varied_reward.py").write_text(
        "def by_parity(responses, answers):\n    return [float(len(r) % 2) for r in responses]\n")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def _cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "train", str(CONFIG), *TINY, f"logging.dir={run}",
            f"checkpoint.dir={run / 'ckpt'}", *extra]


def _train(run: Path, env, *extra: str) -> list[dict]:
    out = subprocess.run(_cmd(run, *extra), env=env, cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return _rows(run)


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def _weights(step_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_dir / "model", tmp / "w.pt")
    state = torch.load(tmp / "w.pt", weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_async_k0_is_the_synchronous_run_bit_for_bit(tmp_path, env):
    steps = "train.steps=3"
    sync = _train(tmp_path / "sync", env, steps)
    async0 = _train(tmp_path / "async0", env, steps, *_async(0))
    assert [r["step"] for r in sync] == [1, 2, 3]
    assert sync[-1]["grad_norm"] > 0 and sync[-1]["loss"] != 0  # the policy moves: equality is not trivial
    assert async0 == sync
    a = _weights(tmp_path / "sync" / "ckpt" / "step_00000003", tmp_path / "sync")
    b = _weights(tmp_path / "async0" / "ckpt" / "step_00000003", tmp_path / "async0")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("k,dynamic", [(1, False), (2, True)], ids=["k1", "k2-dynamic-sampling"])
def test_async_never_trains_on_a_sample_older_than_k(tmp_path, env, k, dynamic):
    """Every sample's version is checked where the trainer consumes it (staleness_metrics raises otherwise); the
    histogram shows the schedule: step t (1-based) trains on samples exactly min(t - 1, k) versions old. With dynamic
    sampling the producer resamples zero-variance groups (half of them with this reward and G = 2) inside the same
    schedule."""
    extra = ["train.dynamic_sampling=true", "train.max_sampling_rounds=3", "rollout.group_size=2"] if dynamic else [
        "eval.interval=2", "eval.max_problems=4", "eval.samples=2"]  # evaluation borrows the producer's engine
    rows = _train(tmp_path / "run", env, "train.steps=5", *_async(k), *extra)
    evals = [r for r in rows if "eval/pass@1" in r]
    rows = [r for r in rows if "staleness/max" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == ([] if dynamic else [2, 4])
    if dynamic:
        assert any(r["rollout/sampling_rounds"] > 1 for r in rows)
    for r in rows:
        lag = min(r["step"] - 1, k)
        assert r["staleness/max"] == r["staleness/mean"] == lag <= k
        assert r[f"staleness/frac_{lag}"] == 1.0
    # stale samples come from another policy: the behaviour ratio moves away from 1 (TIS corrects it)
    assert any(abs(r["offpolicy/ratio_mean"] - 1) > 1e-4 for r in rows if r["staleness/max"] > 0)


@pytest.mark.slow
def test_async_kill_and_resume_gives_the_uninterrupted_metrics(tmp_path, env):
    """SIGKILL once step 3's checkpoint is complete (with k = 2 it holds the batches of steps 4 and 5, sampled with
    older weights; step 6's is regenerated from the checkpoint's), then the same command again."""
    steps = ["train.steps=6", *_async(2)]
    straight = _train(tmp_path / "straight", env, *steps)
    run = tmp_path / "resumed"
    proc = subprocess.Popen(_cmd(run, *steps), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        latest = run / "ckpt" / "latest"
        if latest.exists() and latest.read_text().strip() >= "step_00000003":
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = (run / "ckpt" / "latest").read_text().strip()
    assert killed_at < "step_00000006", "the run finished before it could be killed"
    assert (run / "ckpt" / killed_at / "rollouts_in_flight.pt").is_file()
    out = subprocess.run(_cmd(run, *steps), env=env, cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr
    assert _rows(run) == straight


def test_study_links_the_async_report_once(tmp_path):
    """`python -m launch.study --compare-async` gives docs/results.md one section pointing at its report, replaced
    (not duplicated) when the comparison runs again, and kept apart from the sections after it."""
    from launch.study import SECTIONS, link_sections

    heading = SECTIONS[0][0]
    report, other = tmp_path / "results.md", tmp_path / "results_async.md"
    report.write_text("# Study\n\n## Accuracy\n\nrows\n")
    link_sections(report)
    assert report.read_text() == "# Study\n\n## Accuracy\n\nrows\n"  # no report beside it: no section
    other.write_text("# Rollout study\n")
    link_sections(report)
    link_sections(report)
    text = report.read_text()
    assert text.count(heading) == 1 and text.startswith("# Study\n\n## Accuracy\n\nrows\n")
    assert "[results_async.md](results_async.md)" in text and "--compare-async" in text
    report.write_text(text + "\n## Later\n\nmore\n")
    link_sections(report)
    text = report.read_text()
    assert text.count(heading) == 1 and "## Later\n\nmore" in text and text.endswith("--compare-async`).\n")
