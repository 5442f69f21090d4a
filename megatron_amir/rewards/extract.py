"""Final-answer extraction from model output, without evaluating anything.

Order of preference (the last occurrence of the first kind found wins, since models restate):
1. ``\\boxed{...}`` / ``\\fbox{...}`` with nested braces matched by a linear scan (no regex backtracking);
2. the GSM8K marker ``#### <answer>`` (to the end of the line);
3. ``The answer is <answer>`` / ``final answer is`` (to the end of the sentence/line).

"Last" holds for the third kind too, on purpose: a model that restates or corrects itself ("the answer is 3.
Wait... so the answer is 4.") means its final statement, and the common evaluators read it that way (Qwen's
math evaluation splits on "The answer is" and keeps the last part; lm-eval's flexible extraction keeps the
last match). It also keeps the three kinds consistent.

All scans are linear in the input length; the caller truncates untrusted text first (``truncate``).
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["extract_boxed", "extract_hash", "extract_answer_is", "extract_answer", "normalize_answer",
           "truncate", "has_answer_format", "fold_dashes", "scientific", "SCI_MAX_EXP", "SCI_MAX_MANTISSA"]

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
    """The answer after the last ``The answer is`` (up to a sentence end or line end); the last, not the
    first, like the other two kinds (see the module docstring)."""
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
# unambiguous on purpose: with ``\d+\.?\d*`` a failed fullmatch on a long digit string backtracks
# quadratically (16k digits: seconds; 1M digits: minutes)
_NUM_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# a number in scientific notation, the whole answer: 1e-07, 1E5, 2.5e+3, -.5e2
_SCI_RE = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))[eE]([+-]?\d+)")
# exponents beyond this (and mantissas longer than SCI_MAX_MANTISSA characters) are never expanded or
# evaluated: ``1e999999`` would be a million-digit number. Such an answer equals only the same string.
SCI_MAX_EXP = 1000
SCI_MAX_MANTISSA = 200
# minus signs: U+2212 minus sign, U+FE63 small hyphen-minus, U+FF0D fullwidth hyphen-minus -> always "-"
_MINUS = str.maketrans(dict.fromkeys("\u2212\ufe63\uff0d", "-"))
# typographic dashes (U+2012 figure, U+2013 en, U+2014 em dash, U+2015 horizontal bar) -> "-" unless directly
# between two word characters: "–5", "x = –5", "a – b" are minus signs, "3–5" is a range (math-verify would
# read "3-5" as -2) and "well–known" a hyphen
_TYPO_DASH_RE = re.compile(r"(?<!\w)[\u2012-\u2015]|[\u2012-\u2015](?!\w)")
# a LaTeX-escaped dollar sign in front of an amount: ``\$18``, ``\$ 18``
_ESCAPED_DOLLAR_RE = re.compile(r"\\\$\s*")


def fold_dashes(text: str) -> str:
    """``text`` with Unicode minus signs (U+2212, U+FE63, U+FF0D) replaced by ASCII ``-``, and the dashes
    U+2012-U+2015 too except between two word characters (``3–5`` stays a range). Linear."""
    return _TYPO_DASH_RE.sub("-", text.translate(_MINUS))


def _compact(ans: str) -> str:
    """The answer without the wrapping that never changes its value: ``$``/``\\$`` signs, ``\\(...\\)``,
    surrounding spaces, a trailing period, LaTeX thin spaces; Unicode minus signs become ``-``."""
    s = fold_dashes(ans).strip().rstrip(".").strip().strip("$").strip().rstrip(".").strip()
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    if s.startswith("\\$"):  # currency: \$18 -> 18
        s = _ESCAPED_DOLLAR_RE.sub("", s, count=1)
    # spaces are kept (``"132 7"`` must not become ``1327``); only LaTeX thin spaces go
    return s.replace("{,}", "").replace("\\,", "").replace("\\!", "")


def _scientific_parts(compact: str) -> Optional[tuple[str, Optional[int]]]:
    if "e" not in compact and "E" not in compact:
        return None
    m = _SCI_RE.fullmatch(compact)
    if m is None:
        return None
    mantissa, exp = m.groups()
    digits = exp.lstrip("+-")
    # length first (leading zeros count: an over-long number is never evaluated), then int(): a 5000-digit
    # exponent would otherwise raise (int_max_str_digits) or cost time
    if len(digits) > 6 or int(digits) > SCI_MAX_EXP or len(mantissa) > SCI_MAX_MANTISSA:
        return mantissa, None
    return mantissa, -int(digits) if exp.startswith("-") else int(digits)


def scientific(ans: str) -> Optional[tuple[str, Optional[int]]]:
    """``(mantissa, exponent)`` when the whole answer is one number in scientific notation (``1e-07``,
    ``$2.5E3$``), else None. The exponent is None when the number is out of range (``|exponent| >
    SCI_MAX_EXP``, more than 6 exponent digits, or a mantissa over ``SCI_MAX_MANTISSA`` characters): such a
    number is never evaluated."""
    return _scientific_parts(_compact(ans))


def _expand(mantissa: str, exp: int) -> str:
    """Plain decimal digits of ``mantissa * 10**exp`` by moving the point (no arithmetic, at most
    ``SCI_MAX_EXP + SCI_MAX_MANTISSA`` characters); canonicalized by the caller."""
    neg = mantissa.startswith("-")
    ip, _, fp = mantissa.lstrip("+-").partition(".")
    digits, point = ip + fp, len(ip) + exp
    if point <= 0:
        out = "0." + "0" * -point + digits
    elif point >= len(digits):
        out = digits + "0" * (point - len(digits))
    else:
        out = digits[:point] + "." + digits[point:]
    return ("-" if neg else "") + out


def normalize_answer(ans: str) -> str:
    """Cheap canonical form for exact matching: strip ``$`` (also LaTeX's ``\\$``) and surrounding spaces,
    thousands separators and a trailing period; Unicode minus signs/dashes become ``-``; integers lose
    leading zeros and ``+``; ``-0`` is ``0``; scientific notation within range becomes the plain decimal
    (``1e-07`` -> ``0.0000001``, ``2.5E3`` -> ``2500``; out of range it stays a string, ``e`` lower-cased).
    Anything else is returned stripped (exact string match then)."""
    compact = _compact(ans)
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", compact):
        compact = compact.replace(",", "")
    sci = _scientific_parts(compact)
    if sci is not None:
        mantissa, exp = sci
        if exp is None:
            return compact.lower()
        compact = _expand(mantissa, exp)
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
