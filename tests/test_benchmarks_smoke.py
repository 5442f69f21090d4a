"""Benchmarks stay runnable: a couple of repeats, then the contract of the last line (no timing asserted)."""

from __future__ import annotations

import re

from benchmarks import loss_overhead


def test_loss_overhead_runs_and_ends_with_the_ratio(capsys):
    loss_overhead.main(["--repeats", "3", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"loss_overhead: ratio=\d+\.\d{3} \(goal 1\.10\)", lines[-1])
    assert any(line.startswith("GRPO+diag") for line in lines)


def test_async_overlap_places_trainer_and_fleet_on_disjoint_cpus():
    """The async benchmark models separate devices by CPU affinity: the default split gives the trainer the first
    allowed CPU and the fleet the rest; overlapping or empty sets are refused; --no-pin places nothing."""
    import argparse
    import os

    import pytest

    from benchmarks import async_overlap

    assert async_overlap.parse_cpus("0") == {0} and async_overlap.parse_cpus("1,3-5") == {1, 3, 4, 5}
    allowed = sorted(os.sched_getaffinity(0))

    def args(**kw):
        return argparse.Namespace(**{"no_pin": False, "trainer_cpus": None, "fleet_cpus": None, **kw})

    assert async_overlap.placement(args(no_pin=True)) == (None, None)
    assert async_overlap.pinned(None) is None
    if len(allowed) >= 2:
        trainer, fleet = async_overlap.placement(args())
        assert trainer == {allowed[0]} and fleet == set(allowed[1:])
    with pytest.raises(SystemExit, match="disjoint"):
        async_overlap.placement(args(trainer_cpus=str(allowed[0]), fleet_cpus=str(allowed[0])))


def test_async_overlap_pinning_reaches_the_child_process():
    import os
    import subprocess
    import sys

    from benchmarks import async_overlap

    cpu = max(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                         capture_output=True, text=True, check=True, preexec_fn=async_overlap.pinned({cpu}))
    assert out.stdout.strip() == f"[{cpu}]"


def test_rollout_throughput_names_why_vllm_is_left_out(capsys):
    """The default model's head size (64 / 4 = 16) is not one vLLM's CPU attention supports: the vLLM rows are
    left out with that reason, and the ratio line stays last."""
    from benchmarks import rollout_throughput

    rollout_throughput.main(["--prompts", "2", "--n", "2", "--new-tokens", "4", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"rollout_throughput: ratio=\d+\.\d{2} \(goal 2\)", lines[-1])
    assert any(line.startswith("real vLLM left out:") and ("head size 16" in line or "virtualenv" in line)
               for line in lines)
