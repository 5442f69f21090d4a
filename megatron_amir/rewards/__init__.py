"""Verifiable rewards: answer extraction, exact match, sandboxed math-verify, and a registry.

``get_reward_fn(name_or_path, cfg=None, **kwargs)`` returns a ``RewardFn``:

- ``"exact"`` / ``"synthetic"``: ``ExactReward`` (fast, in-process; the demo's reward)
- ``"math"``: ``MathReward`` (math-verify in a killable worker pool with time and memory limits)
- ``"package.module:function"`` or ``"package.module.function"``: a user function
  ``fn(responses: list[str], answers: list[str]) -> RewardResult | list[float]`` (a list is wrapped;
  ``correct`` is then ``reward > 0``), or a ``RewardFn`` subclass (instantiated with the keyword
  arguments derived from ``cfg``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Optional

from .base import RewardFn, RewardResult
from .exact import ExactReward
from .extract import extract_answer, normalize_answer

__all__ = ["RewardFn", "RewardResult", "ExactReward", "MathReward", "get_reward_fn", "register_reward",
           "extract_answer", "normalize_answer", "REGISTRY"]


def _math_reward(**kw) -> RewardFn:
    from .math_reward import MathReward

    return MathReward(**kw)


REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "exact": ExactReward,
    "synthetic": ExactReward,
    "math": _math_reward,
}


def register_reward(name: str, factory: Callable[..., RewardFn]) -> None:
    """Add a named reward (the factory receives the keyword arguments of ``get_reward_fn``)."""
    if not name or ":" in name or "." in name:
        raise ValueError(f"reward name {name!r} must be a plain word (dotted paths are resolved, not registered)")
    REGISTRY[name] = factory


class _UserReward(RewardFn):
    def __init__(self, fn: Callable, path: str):
        self.fn, self.name = fn, path

    def __call__(self, responses: list[str], answers: list[str]) -> RewardResult:
        out = self.fn(responses, answers)
        if isinstance(out, RewardResult):
            return out
        try:
            rewards = [float(x) for x in out]
        except TypeError as exc:
            raise TypeError(f"reward function {self.name} returned {type(out).__name__}; "
                            "expected RewardResult or a list of floats") from exc
        if len(rewards) != len(responses):
            raise ValueError(f"reward function {self.name} returned {len(rewards)} rewards for "
                             f"{len(responses)} responses")
        return RewardResult(rewards=rewards, correct=[r > 0 for r in rewards])


def _resolve(path: str) -> Any:
    if ":" in path:
        mod_name, attr = path.split(":", 1)
    else:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"reward {path!r}: not a registered name ({sorted(REGISTRY)}) nor a module:function path")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"reward {path!r}: cannot import module {mod_name!r}: {exc}") from exc
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def get_reward_fn(name_or_path: str, cfg: Optional[Any] = None, **kwargs) -> RewardFn:
    """Build a reward function by registry name or dotted path.

    ``cfg`` is a ``RewardConfig``; its fields (format_weight, correct_weight, style, answer_form, timeout_s, num_workers,
    memory_limit_mb, max_answer_chars) become keyword arguments, and explicit ``kwargs`` override them.
    """
    params: dict[str, Any] = {}
    if cfg is not None:
        for k in ("format_weight", "timeout_s", "num_workers", "memory_limit_mb", "max_answer_chars"):
            if hasattr(cfg, k):
                params[k] = getattr(cfg, k)
        # fields added later go only where set, so a user RewardFn class written before them keeps working
        for k, default in (("correct_weight", 1.0), ("style", "any"), ("answer_form", "any")):
            if getattr(cfg, k, default) != default:
                params[k] = getattr(cfg, k)
    params.update(kwargs)
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path](**params)
    obj = _resolve(name_or_path)
    if inspect.isclass(obj) and issubclass(obj, RewardFn):
        return obj(**params)
    if not callable(obj):
        raise ValueError(f"reward {name_or_path!r} resolved to a non-callable {type(obj).__name__}")
    return _UserReward(obj, name_or_path)


def __getattr__(name: str):  # MathReward imported lazily (math-verify pulls in sympy)
    if name == "MathReward":
        from .math_reward import MathReward

        return MathReward
    raise AttributeError(name)
