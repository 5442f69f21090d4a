"""``math`` reward: answer extraction + math-verify equivalence in a sandboxed worker pool.

Per response: truncate (keep the tail, drop NUL bytes) -> extract the final answer (``\\boxed{}``,
``####``, "The answer is") -> cut the answer to ``max_answer_chars`` -> Unicode minus signs/dashes to
ASCII ``-`` (gold and answer) -> decide:

0. scientific notation (``1e-07``, ``2.5E3``), always in the parent (math-verify reads ``1e-07`` as
   ``1*e - 7``): a number whose exponent or mantissa is out of range (``1e999999``) equals only the same
   string, never anything else; otherwise, against another simple number, equal as exact fractions is
   correct and unequal is final (no rounding: ``1e-07`` != ``2e-07``); against anything else it goes to
   math-verify written as ``m\\times10^{e}``.
1. fast path in the parent, no parsing: normalized strings equal -> correct; both simple numbers
   (integers, decimals, ``\\frac{a}{b}``, ``a/b``) -> equal as exact fractions is correct; unequal is
   final only without decimals (with a decimal, math-verify's rounding decides in the pool). This
   covers most typical answers.
2. otherwise math-verify in a ``SandboxPool`` worker with per-call limits: ``timeout_s`` of CPU time,
   ``wall_factor * timeout_s`` of wall time, a SIGKILL ``grace_s`` after that, and ``memory_limit_mb``.
   A timeout scores 0 and is counted in ``RewardResult.timeouts``; a crash or memory error scores 0
   and is counted in ``errors``. Results are cached per (gold, answer) pair (groups repeat answers).

``answer_form="number"`` first requires the extracted answer to be a number itself (``_value``: integer, decimal,
fraction, scientific notation): math-verify evaluates ``86 - 0`` to 86, and a policy asked for 86 learns to restate
the question as its answer.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from fractions import Fraction
from typing import Optional

from .base import RewardFn, RewardResult, check_lengths, check_weights, combine_format
from .extract import extract_answer, fold_dashes, normalize_answer, scientific, truncate

__all__ = ["MathReward"]

_WORKER_FN = "megatron_amir.rewards.math_worker:verify_answer"
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUM = re.compile(rf"-?{_NUM}")
_FRAC = re.compile(rf"(-)?\\[dt]?frac\{{\s*(-?{_NUM})\s*\}}\{{\s*(-?{_NUM})\s*\}}")
_SLASH = re.compile(rf"(-?{_NUM})\s*/\s*(-?{_NUM})")


def _number(s: str) -> Optional[tuple[Fraction, bool]]:
    """(value, has_decimal_point) of an integer, decimal, ``\\frac{a}{b}`` or ``a/b``; None otherwise.
    Length-capped: huge digit strings go to the pool."""
    if len(s) > 200:
        return None
    try:
        if _PLAIN_NUM.fullmatch(s):
            return Fraction(s), "." in s
        m = _FRAC.fullmatch(s)
        if m:
            sign, num, den = m.groups()
            val = Fraction(num) / Fraction(den)
            return (-val if sign else val), "." in num + den
        m = _SLASH.fullmatch(s)
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2)), "." in s
    except ZeroDivisionError:
        return None
    return None


def _value(s: str) -> Optional[Fraction]:
    """Exact value of a simple number (``_number`` forms or scientific notation within range), else None."""
    sci = scientific(s)
    if sci is not None:
        mantissa, exp = sci
        # both bounded by scientific(): <= SCI_MAX_MANTISSA characters, |exp| <= SCI_MAX_EXP
        return None if exp is None else Fraction(mantissa) * Fraction(10) ** exp
    num = _number(normalize_answer(s))
    return None if num is None else num[0]


# the constant e in a gold answer: a lone ``e``, not part of a word or a LaTeX command (``\\sec``, ``\\left``)
_EULER_RE = re.compile(r"(?<![A-Za-z\\])e(?![A-Za-z])")


def _sci_reading(gold: str) -> bool:
    """Whether an answer like ``2e-1`` is read as 2·10⁻¹ against ``gold``: yes unless the gold writes Euler's e
    (``2e - 1``, ``2(e+1)``) and is not itself in scientific notation; then math-verify decides on the strings as
    written (where ``2e-1`` is 2e − 1)."""
    return scientific(gold) is not None or _EULER_RE.search(gold) is None


def _scientific_verdict(gold: str, ans: str) -> Optional[bool]:
    """Verdict when either side is in scientific notation (read as such against ``gold``, ``_sci_reading``) and
    no parsing is needed; None otherwise."""
    sg, sa = scientific(gold), scientific(ans)
    if (sg is None and sa is None) or not _sci_reading(gold):
        return None
    g, a = normalize_answer(gold), normalize_answer(ans)
    if g and g == a:
        return True
    if (sg is not None and sg[1] is None) or (sa is not None and sa[1] is None):
        return False  # out of range: never evaluated, equal only to the same string
    vg, va = _value(gold), _value(ans)
    if vg is not None and va is not None:
        return vg == va
    return None


def _pool_form(s: str) -> str:
    """The answer as math-verify should see it: scientific notation as ``m\\times10^{e}``."""
    sci = scientific(s)
    if sci is None or sci[1] is None:
        return s
    return f"{sci[0].lstrip('+')}\\times10^{{{sci[1]}}}"


def _pool_pair(gold: str, ans: str) -> tuple[str, str]:
    """(gold, answer) for math-verify: scientific notation rewritten as ``m\\times10^{e}`` unless the gold writes
    Euler's e."""
    if not _sci_reading(gold):
        return gold, ans
    return _pool_form(gold), _pool_form(ans)


class MathReward(RewardFn):
    name = "math"

    def __init__(self, format_weight: float = 0.0, timeout_s: float = 5.0, num_workers: int = 2,
                 memory_limit_mb: int = 1024, max_answer_chars: int = 2000, float_rounding: int = 6,
                 fast_path: bool = True, cache_size: int = 100_000, grace_s: float = 0.5, chunk_size: int = 16,
                 wall_factor: float = 2.0, correct_weight: float = 1.0, answer_form: str = "any", **_ignored):
        self.format_weight, self.correct_weight = check_weights(format_weight, correct_weight)
        if answer_form not in ("any", "number"):
            raise ValueError(f"reward.answer_form: unknown {answer_form!r} (known: 'any', 'number')")
        self.answer_form = answer_form
        self.timeout_s, self.num_workers, self.memory_limit_mb = float(timeout_s), int(num_workers), memory_limit_mb
        self.max_answer_chars = int(max_answer_chars)
        self.float_rounding, self.fast_path = int(float_rounding), bool(fast_path)
        self.grace_s, self.chunk_size, self.wall_factor = float(grace_s), int(chunk_size), float(wall_factor)
        self._cache: OrderedDict[tuple[str, str], tuple[str, bool]] = OrderedDict()
        self._cache_size = int(cache_size)
        self._pool = None
        self.stats = {"fast_path": 0, "scientific": 0, "cache_hits": 0, "pool_calls": 0}

    @property
    def pool(self):
        if self._pool is None:
            from .pool import SandboxPool

            self._pool = SandboxPool(self.num_workers, timeout_s=self.timeout_s,
                                     memory_limit_mb=self.memory_limit_mb,
                                     preload=("megatron_amir.rewards.math_worker",),
                                     grace_s=self.grace_s, chunk_size=self.chunk_size,
                                     wall_factor=self.wall_factor)
        return self._pool

    def _fast(self, gold: str, ans: str) -> Optional[bool]:
        g, a = normalize_answer(gold), normalize_answer(ans)
        if g == a and g:
            return True
        fg, fa = _number(g), _number(a)
        if fg is not None and fa is not None:
            if fg[0] == fa[0]:
                return True
            if not (fg[1] or fa[1]):  # exact rationals on both sides: unequal is final
                return False
            # a decimal is involved: math-verify rounds (float_rounding), let it decide
        return None

    def __call__(self, responses: list[str], answers: list[str]) -> RewardResult:
        check_lengths(responses, answers)
        n = len(responses)
        extracted: list[Optional[str]] = []
        correct = [False] * n
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (resp, gold) in enumerate(zip(responses, answers)):
            ans = extract_answer(truncate(resp, self.max_answer_chars * 8))
            too_long = ans is not None and len(ans) > self.max_answer_chars
            if too_long:
                ans = truncate(ans, self.max_answer_chars)
            extracted.append(ans)
            if too_long:  # a cut answer is not the answer the model gave: never correct
                continue
            if not ans:
                continue
            gold = fold_dashes(truncate(gold, self.max_answer_chars))
            ans = fold_dashes(ans)  # the record above keeps the answer as written
            if self.answer_form == "number" and _value(ans) is None:
                continue
            sci = _scientific_verdict(gold, ans)
            if sci is not None:
                correct[i] = sci
                self.stats["scientific"] += 1
                continue
            if self.fast_path:
                fast = self._fast(gold, ans)
                if fast is not None:
                    correct[i] = fast
                    self.stats["fast_path"] += 1
                    continue
            todo.setdefault(_pool_pair(gold, ans), []).append(i)
        timeouts = errors = 0
        keys = list(todo)
        statuses: dict[tuple[str, str], tuple[str, bool]] = {}
        for k in keys:
            if k in self._cache:
                self._cache.move_to_end(k)
                statuses[k] = self._cache[k]
                self.stats["cache_hits"] += len(todo[k])
        missing = [k for k in keys if k not in statuses]
        if missing:
            self.stats["pool_calls"] += len(missing)
            results = self.pool.map(_WORKER_FN, [(g, a, self.float_rounding) for g, a in missing])
            for k, r in zip(missing, results):
                statuses[k] = (r.status, bool(r.value) if r.status == "ok" else False)
                if r.status == "ok":  # a crash or wall-clock kill may be transient: do not pin it
                    self._cache[k] = statuses[k]
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        for k in keys:
            status, ok = statuses[k]
            for i in todo[k]:
                correct[i] = ok
                timeouts += status == "timeout"
                errors += status == "error"
        fmt = [a is not None for a in extracted]
        return RewardResult(rewards=combine_format(correct, fmt, self.format_weight, self.correct_weight),
                            correct=correct, timeouts=timeouts, errors=errors, format_ok=fmt, extracted=extracted)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
