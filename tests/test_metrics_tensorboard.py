"""TensorBoard side of MetricsLogger: one run per kind, and a resume purges the re-done steps."""

from __future__ import annotations

import pytest

from megatron_amir.training.checkpoint import WARMUP_KIND
from megatron_amir.training.metrics import RL_KIND, MetricsLogger

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(run_dir, tag):
    acc = event_accumulator.EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resume_purges_tensorboard_points_past_the_resumed_step(tmp_path):
    m = MetricsLogger(tmp_path)
    for step in range(1, 6):
        m.log(step, {"loss": float(step)})
    m.close()
    # preempted after step 5, resumed from the checkpoint of step 3: steps 4 and 5 are done again
    m = MetricsLogger(tmp_path)
    m.truncate_after(3, kind=RL_KIND)
    for step in (4, 5, 6):
        m.log(step, {"loss": 10.0 * step})
    m.close()
    assert scalars(tmp_path / "tensorboard" / RL_KIND, "loss") == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert [r["step"] for r in map(__import__("json").loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] \
        == [1, 2, 3, 4, 5, 6]


def test_warmup_and_rl_runs_do_not_purge_each_other(tmp_path):
    warm = MetricsLogger(tmp_path, kind=WARMUP_KIND)
    for step in range(1, 5):
        warm.log(step, {"sft/loss": float(step)})
    warm.close()
    rl = MetricsLogger(tmp_path)
    for step in range(1, 4):
        rl.log(step, {"loss": float(step)})
    rl.truncate_after(1, kind=RL_KIND)  # an RL resume at step 1
    rl.log(2, {"loss": 20.0})
    rl.close()
    assert scalars(tmp_path / "tensorboard" / WARMUP_KIND, "sft/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert scalars(tmp_path / "tensorboard" / RL_KIND, "loss") == [(1, 1.0), (2, 20.0)]
