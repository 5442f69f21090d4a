"""Runs inside a sandbox worker process (see ``pool.py``): math-verify equivalence of two answer strings.

Answers arrive already extracted and truncated by the parent. Both are wrapped in ``\\boxed{}`` before
parsing, because math-verify returns nothing for bare golds like ``\\sqrt{8}`` or ``(1,2)``
(math-verify's parser only looks for answers inside such markers). math-verify's own signal-based
timeouts are disabled here: the pool's alarm and hard kill bound every call instead (and math-verify would
log the whole input on its own timeouts).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from math_verify import parse, verify

# "timeout disabled" notices and full-input logging are noise here; the pool bounds time itself
logging.getLogger("math_verify").setLevel(logging.CRITICAL)

__all__ = ["verify_answer", "wrap"]


def wrap(ans: str) -> str:
    """Put an answer where math-verify's highest-priority extractor looks for it."""
    if "\\boxed" in ans or (ans.startswith("$") and ans.endswith("$") and len(ans) > 1):
        return ans
    return "\\boxed{" + ans + "}"


@lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    # golds repeat across a group of G rollouts: parse each once per worker
    return parse(wrap(gold), parsing_timeout=None)


def verify_answer(gold: str, pred: str, float_rounding: int = 6) -> bool:
    """True when ``pred`` is mathematically equivalent to ``gold`` according to math-verify."""
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:  # unparseable gold: only an identical string can match
        return gold.strip() == pred.strip() and bool(gold.strip())
    pred_parsed = parse(wrap(pred), parsing_timeout=None)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, float_rounding=float_rounding, timeout_seconds=None))


def _warm_up() -> None:
    """Run a few verifications at import. Imported in the fork server (pool preload), this loads the
    LaTeX parser and sympy's lazy state once, so every forked worker starts warm (first calls otherwise
    take tens of milliseconds each)."""
    for gold, pred in (("\\frac{1}{2}", "0.5"), ("(1,2)", "(1, 2)"), ("\\{1,2\\}", "\\{2,1\\}"),
                       ("[0,1)", "[0, 1)"), ("\\sqrt{8}", "2\\sqrt{2}"), ("x=3", "3"), ("10\\%", "10"),
                       ("a+b", "b+a"), ("\\pi", "3.14159"), ("90^\\circ", "90"),
                       ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}")):
        verify_answer(gold, pred)


_warm_up()
