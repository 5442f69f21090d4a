"""Benchmarks stay runnable: a couple of repeats, then the contract of the last line (no timing asserted)."""

from __future__ import annotations

import re

from benchmarks import loss_overhead


def test_loss_overhead_runs_and_ends_with_the_ratio(capsys):
    loss_overhead.main(["--repeats", "3", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"loss_overhead: ratio=\d+\.\d{3} \(goal 1\.10\)", lines[-1])
    assert any(line.startswith("GRPO+diag") for line in lines)


def test_rollout_throughput_names_why_vllm_is_left_out(capsys):
    """The default model's head size (64 / 4 = 16) is not one vLLM's CPU attention supports: the vLLM rows are
    left out with that reason, and the ratio line stays last."""
    from benchmarks import rollout_throughput

    rollout_throughput.main(["--prompts", "2", "--n", "2", "--new-tokens", "4", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"rollout_throughput: ratio=\d+\.\d{2} \(goal 2\)", lines[-1])
    assert any(line.startswith("real vLLM left out:") and ("head size 16" in line or "virtualenv" in line)
               for line in lines)
