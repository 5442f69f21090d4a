"""Fast exact-match reward: extract the final answer, normalize, compare strings. No worker pool.

This is the reward of the synthetic demo task (integer answers after ``####``): microseconds per
response, so RL steps are not slowed by verification. Integers compare by value (``+007`` == ``7``,
``1,000`` == ``1000``), decimals by canonical form (``2.50`` == ``2.5``); anything else by exact string.

``style`` (the length-bias study's verifier variant): ``restated`` / ``direct`` count an answer as correct only when
the response also restates the problem first / does not (``megatron_amir.data.synthetic.is_restated``).
"""

from __future__ import annotations

from .base import RewardFn, RewardResult, check_lengths, check_weights, combine_format
from .extract import extract_answer, normalize_answer, truncate

__all__ = ["ExactReward"]


class ExactReward(RewardFn):
    name = "exact"

    def __init__(self, format_weight: float = 0.0, max_answer_chars: int = 2000, correct_weight: float = 1.0,
                 style: str = "any", **_ignored):
        self.format_weight, self.correct_weight = check_weights(format_weight, correct_weight)
        if style not in ("any", "restated", "direct"):
            raise ValueError(f"reward.style: unknown {style!r} (known: 'any', 'restated', 'direct')")
        self.style = style
        # the whole response is scanned; cap it (answers sit at the end) so cost stays linear and small
        self.max_chars = max(16, int(max_answer_chars)) * 8

    def __call__(self, responses: list[str], answers: list[str]) -> RewardResult:
        check_lengths(responses, answers)
        extracted, correct, fmt = [], [], []
        for resp, gold in zip(responses, answers):
            ans = extract_answer(truncate(resp, self.max_chars))
            extracted.append(ans)
            fmt.append(ans is not None)
            correct.append(ans is not None and normalize_answer(ans) == normalize_answer(gold) and self._styled(resp))
        return RewardResult(rewards=combine_format(correct, fmt, self.format_weight, self.correct_weight),
                            correct=correct,
                            format_ok=fmt, extracted=extracted)

    def _styled(self, response: str) -> bool:
        if self.style == "any":
            return True
        from megatron_amir.data.synthetic import is_restated

        return is_restated(response) == (self.style == "restated")
