"""Fast exact-match reward: extract the final answer, normalize, compare strings. No worker pool.

This is the reward of the synthetic demo task (integer answers after ``####``): microseconds per
response, so RL steps are not slowed by verification. Integers compare by value (``+007`` == ``7``,
``1,000`` == ``1000``), decimals by canonical form (``2.50`` == ``2.5``); anything else by exact string.
"""

from __future__ import annotations

from .base import RewardFn, RewardResult, check_lengths, combine_format
from .extract import extract_answer, normalize_answer, truncate

__all__ = ["ExactReward"]


class ExactReward(RewardFn):
    name = "exact"

    def __init__(self, format_weight: float = 0.0, max_answer_chars: int = 2000, **_ignored):
        if format_weight < 0:
            raise ValueError(f"format_weight must be >= 0, got {format_weight}")
        self.format_weight = float(format_weight)
        # the whole response is scanned; cap it (answers sit at the end) so cost stays linear and small
        self.max_chars = max(16, int(max_answer_chars)) * 8

    def __call__(self, responses: list[str], answers: list[str]) -> RewardResult:
        check_lengths(responses, answers)
        extracted, correct, fmt = [], [], []
        for resp, gold in zip(responses, answers):
            ans = extract_answer(truncate(resp, self.max_chars))
            extracted.append(ans)
            fmt.append(ans is not None)
            correct.append(ans is not None and normalize_answer(ans) == normalize_answer(gold))
        return RewardResult(rewards=combine_format(correct, fmt, self.format_weight), correct=correct,
                            format_ok=fmt, extracted=extracted)
