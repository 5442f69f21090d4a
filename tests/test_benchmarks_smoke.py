"""Benchmarks stay runnable: a couple of repeats, then the contract of the last line (no timing asserted)."""

from __future__ import annotations

import re

from benchmarks import loss_overhead


def test_loss_overhead_runs_and_ends_with_the_ratio(capsys):
    loss_overhead.main(["--repeats", "3", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"loss_overhead: ratio=\d+\.\d{3} \(goal 1\.10\)", lines[-1])
    assert any(line.startswith("GRPO+diag") for line in lines)
