"""Final-answer extraction from model output, without evaluating anything.

Order of preference (the last occurrence of the first kind found wins, since models restate):
1. ``\\boxed{...}`` / ``\\fbox{...}`` with nested braces matched by a linear scan (no regex backtracking);
2. the GSM8K marker ``#### <answer>`` (to the end of the line);
3. ``The answer is <answer>`` / ``final answer is`` (to the end of the sentence/line).

All scans are linear in the input length; the caller truncates untrusted text first (``truncate``).
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["extract_boxed", "extract_hash", "extract_answer_is", "extract_answer", "normalize_answer",
           "truncate", "has_answer_format"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*", re.IGNORECASE)


def truncate(text: str, max_chars: int) -> str:
    """Keep the last ``max_chars`` characters (the final answer sits at the end) and drop NUL bytes."""
    if len(text) > max_chars:
        text = text[-max_chars:]
    return text.replace("\x00", "")


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of the closing ``}`` of every matched ``{`` (escaped ``\\{``/``\\}`` skipped), in one linear pass.

    One pass for all boxes, not a scan per box: a response of thousands of unclosed ``\\boxed{`` made the
    per-box scan quadratic (seconds per response on the trainer's rank 0)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{}``), nested braces kept; also the
    brace-less form ``\\boxed 5``."""
    last = None
    pairs = None
    for m in _BOX_RE.finditer(text):
        pairs = _brace_pairs(text) if pairs is None else pairs
        close = pairs.get(m.end() - 1)
        if close is not None and text[m.end():close].strip():
            last = text[m.end():close]
    if last is None:
        m = None
        for m in re.finditer(r"\\boxed ([^\s$]+)", text):
            pass
        if m is not None:
            last = m.group(1)
    return None if last is None else last.strip()


def extract_hash(text: str) -> Optional[str]:
    """The answer after the last GSM8K ``####`` marker (to the end of the line)."""
    last = None
    for m in _HASH_RE.finditer(text):
        if m.group(1).strip():
            last = m.group(1)
    if last is None:
        return None
    last = last.strip()
    return last or None


def extract_answer_is(text: str) -> Optional[str]:
    """The answer after the last ``The answer is`` (up to a sentence end or line end)."""
    last = None
    for m in _ANSWER_IS_RE.finditer(text):
        last = m
    if last is None:
        return None
    rest = text[last.end():].split("\n", 1)[0].strip()
    if rest.startswith("$"):  # "$x$." keep the math
        close = rest.find("$", 1)
        if close > 0:
            return rest[: close + 1].strip() or None
    # a period followed by space/end closes the sentence; decimal points do not
    rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]
    return rest.strip().rstrip(".") or None


def extract_answer(text: str) -> Optional[str]:
    """The final answer in ``text`` or None: boxed, then ``####``, then "The answer is"."""
    for fn in (extract_boxed, extract_hash, extract_answer_is):
        ans = fn(text)
        if ans:
            return ans
    return None


def has_answer_format(text: str) -> bool:
    """True when an answer can be extracted (used by the optional format reward)."""
    return extract_answer(text) is not None


_INT_RE = re.compile(r"[+-]?\d+")
_NUM_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def normalize_answer(ans: str) -> str:
    """Cheap canonical form for exact matching: strip ``$`` and surrounding spaces, thousands separators
    and a trailing period; integers lose leading zeros and ``+``; ``-0`` is ``0``.
    Anything else is returned stripped (exact string match then)."""
    s = ans.strip().rstrip(".").strip().strip("$").strip().rstrip(".").strip()
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    # spaces are kept (``"132 7"`` must not become ``1327``); only LaTeX thin spaces go
    compact = s.replace("{,}", "").replace("\\,", "").replace("\\!", "")
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", compact):
        compact = compact.replace(",", "")
    if _INT_RE.fullmatch(compact):
        # textual canonical form: int() of > 4300 digits raises (CPython's int_max_str_digits)
        neg, digits = compact.startswith("-"), compact.lstrip("+-").lstrip("0") or "0"
        return "-" + digits if neg and digits != "0" else digits
    if _NUM_RE.fullmatch(compact):
        # canonical decimal: drop trailing zeros, keep integers integral ("2.50" -> "2.5", "3.0" -> "3")
        neg = compact.startswith("-")
        body = compact.lstrip("+-")
        if "." in body:
            ip, fp = body.split(".", 1)
            fp = fp.rstrip("0")
            ip = ip.lstrip("0") or "0"
            body = ip + ("." + fp if fp else "")
        out = ("-" if neg else "") + body
        return "0" if out in ("-0", "0") else out
    return compact
