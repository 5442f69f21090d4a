"""Reward function interface and result type shared by every verifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["RewardResult", "RewardFn", "combine_format", "check_weights"]


@dataclass
class RewardResult:
    """Per-response rewards of one batch.

    rewards[i]: float reward of response i (correct_weight * correctness, plus format_weight * format_ok[i])
    correct[i]: whether the extracted answer matched the reference answer
    format_ok[i]: whether a final answer could be extracted at all
    extracted[i]: the extracted answer text (None when absent)
    timeouts: how many verifications hit the time limit (each scored 0)
    errors: how many verifications failed otherwise (worker crash, memory limit, parse error; scored 0)
    """

    rewards: list[float]
    correct: list[bool]
    timeouts: int = 0
    errors: int = 0
    format_ok: list[bool] = field(default_factory=list)
    extracted: list[Optional[str]] = field(default_factory=list)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        n = max(1, len(self.rewards))
        return {
            f"{prefix}mean": sum(self.rewards) / n,
            f"{prefix}accuracy": sum(self.correct) / n,
            f"{prefix}format_rate": (sum(self.format_ok) / n) if self.format_ok else float("nan"),
            f"{prefix}timeouts": float(self.timeouts),
            f"{prefix}errors": float(self.errors),
        }


class RewardFn:
    """``fn(responses, answers) -> RewardResult``; ``close()`` releases workers (a no-op by default)."""

    name: str = "base"

    def __call__(self, responses: list[str], answers: list[str]) -> RewardResult:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_lengths(responses, answers) -> None:
    if len(responses) != len(answers):
        raise ValueError(f"reward: {len(responses)} responses but {len(answers)} answers")
    for i, (r, a) in enumerate(zip(responses, answers)):
        if not isinstance(r, str):
            raise TypeError(f"reward: responses[{i}] must be str, got {type(r).__name__}")
        if not isinstance(a, str):
            raise TypeError(f"reward: answers[{i}] must be str, got {type(a).__name__}")


def combine_format(correct: list[bool], format_ok: list[bool], format_weight: float,
                   correct_weight: float = 1.0) -> list[float]:
    """reward_i = correct_weight * 1[correct_i] + format_weight * 1[format_ok_i]."""
    return [correct_weight * float(c) + format_weight * float(f) for c, f in zip(correct, format_ok)]


def check_weights(format_weight: float, correct_weight: float) -> tuple[float, float]:
    if format_weight < 0:
        raise ValueError(f"format_weight must be >= 0, got {format_weight}")
    if not correct_weight > 0:
        raise ValueError(f"correct_weight must be > 0, got {correct_weight}")
    return float(format_weight), float(correct_weight)
