"""Synthetic verifiable math task with a reasoning scratchpad of varying length.

Why a scratchpad: with 2-3 token answers GRPO's length bias and the separation of correct and incorrect
reasoning chains cannot show (there is nothing between prompt and answer to be longer or likelier). Every
completion here is a short, regular chain of written-out steps followed by a final answer marked
``#### <answer>`` (the GSM8K marker, which ``megatron_amir.rewards.extract`` reads). The number of steps
depends on the operands (digits, carries, borrows, zero digits), so response lengths vary inside one kind,
and difficulty levels are mixed.

Formats (prompt -> solution), one per kind:

- ``add``  ``47+85=``  ->  ``7+5=12 4+8+1=13 #### 132``
  one step per column from the units up; ``+1`` appears when a carry comes in.
- ``sub``  ``82-35=``  ->  ``12-5=7 8-1-3=4 #### 47``     (a >= b, so answers are >= 0)
  one step per column; a borrow out writes the top digit as ``1t``, a borrow in writes ``-1``.
- ``mul``  ``47*36=``  ->  ``47*6=282 47*30=1410 282+1410=1692 #### 1692``
  one partial product per non-zero digit of the second operand, then their sum (when there are several).
  difficulty 1 uses a one-digit second operand.
- ``linear`` ``3x+7=22 x=``  ->  ``3x=22-7=15 x=15/3=5 #### 5``  and, at difficulty 3,
  ``5x+3=2x+18 x=`` -> ``5x-2x=18-3 3x=15 x=15/3=5 #### 5``.
- ``word`` ``Ann has 23 pens. She buys 4 boxes of 6 pens. How many pens now?`` -> ``4*6=24 23+24=47 #### 47``

Restated variant (``restate_fraction`` > 0, add/sub/mul only): a fraction of the problems, picked by a hash of the
seed and the id, have their solution begin by restating the problem: ``47+85= 7+5=12 4+8+1=13 #### 132``. The pick
cannot be told from the prompt, so a model trained on the mix writes either style for any prompt; ``is_restated``
tells them apart (the first word of a restated response ends with ``=``, a column step never does). With the
``reward.style`` gate this makes the length-bias study's task: correct chains systematically longer (or shorter)
than incorrect ones of the same prompt.

Splits are disjoint by problem identity (``Problem.id``, which is the kind and the prompt text) and
deterministic by seed. The test split is drawn first from the seed's stream, so it does not change
when ``num_train`` changes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable, Optional

__all__ = ["Problem", "KINDS", "ANSWER_MARKER", "make_problem", "make_splits", "corpus_lines", "restate",
           "is_restated", "RESTATABLE_KINDS"]

ANSWER_MARKER = "####"
KINDS = ("add", "sub", "mul", "linear", "word")
RESTATABLE_KINDS = ("add", "sub", "mul")  # prompts of one word ending in '=', which is what is_restated looks for


@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    id: unique identity ``<kind>:<prompt>`` (two problems are the same problem iff ids match)
    prompt: the text the model is conditioned on
    answer: canonical final answer (an integer in decimal, ``-`` for negatives)
    solution: the target completion (scratchpad + ``#### answer``), without EOS
    kind: add | sub | mul | linear | word
    difficulty: 1 (easiest) .. 3
    """

    id: str
    prompt: str
    answer: str
    solution: str
    kind: str
    difficulty: int

    def to_dict(self) -> dict:
        return asdict(self)


def _digits(rng: random.Random, n: int) -> int:
    """A uniformly random integer with exactly n decimal digits (n=1 includes 0)."""
    if n <= 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (n - 1), 10**n - 1)


def _finish(kind: str, prompt: str, steps: list[str], answer: int, difficulty: int) -> Problem:
    ans = str(answer)
    solution = " ".join([*steps, f"{ANSWER_MARKER} {ans}"])
    return Problem(id=f"{kind}:{prompt}", prompt=prompt, answer=ans, solution=solution, kind=kind,
                   difficulty=difficulty)


# ----------------------------------------------------------------------------------------- scratchpads
def add_steps(a: int, b: int) -> list[str]:
    """Column additions from the units up; ``+1`` when a carry comes in. The last column's sum
    (with its carry) is written whole, so the answer is the last sum followed by the units digits
    of the earlier columns in reverse order."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return steps


def sub_steps(a: int, b: int) -> list[str]:
    """Column subtractions (a >= b) from the units up. A column that borrows writes its top digit as
    ``1t``; a column that lends writes ``-1``. Leading columns where b has no digit and nothing is
    borrowed are copied silently (they add no step)."""
    if a < b:
        raise ValueError(f"sub_steps needs a >= b, got {a} < {b}")
    da, db = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(da)):
        t = int(da[i])
        u = int(db[i]) if i < len(db) else 0
        if i >= len(db) and not borrow:
            continue
        r = t - borrow - u
        out = r < 0
        r += 10 if out else 0
        top = f"1{t}" if out else f"{t}"
        steps.append(f"{top}{'-1' if borrow else ''}-{u}={r}")
        borrow = int(out)
    return steps


def mul_steps(a: int, b: int) -> list[str]:
    """One partial product per non-zero digit of b (the digit times its place value), then the sum of
    the partial products when there are several. b == 0 gives the single step ``a*0=0``."""
    partials: list[int] = []
    steps: list[str] = []
    for place, ch in enumerate(str(b)[::-1]):
        d = int(ch)
        if d == 0:
            continue
        m = d * 10**place
        p = a * m
        steps.append(f"{a}*{m}={p}")
        partials.append(p)
    if not partials:
        return [f"{a}*0=0"]
    if len(partials) > 1:
        steps.append("+".join(map(str, partials)) + f"={sum(partials)}")
    return steps


def _signed(v: int) -> str:
    return f"+{v}" if v >= 0 else f"-{-v}"


def _coef(a: int) -> str:
    return "" if a == 1 else ("-" if a == -1 else str(a))


# ----------------------------------------------------------------------------------------- generators
def _gen_add(rng: random.Random, lo: int, hi: int) -> Problem:
    na, nb = rng.randint(lo, hi), rng.randint(lo, hi)
    a, b = _digits(rng, na), _digits(rng, nb)
    steps = add_steps(a, b)
    carries = sum("+1=" in s for s in steps)
    return _finish("add", f"{a}+{b}=", steps, a + b, 1 + (max(na, nb) > lo) + (carries > 1))


def _gen_sub(rng: random.Random, lo: int, hi: int) -> Problem:
    na, nb = rng.randint(lo, hi), rng.randint(lo, hi)
    a, b = _digits(rng, na), _digits(rng, nb)
    a, b = max(a, b), min(a, b)
    steps = sub_steps(a, b)
    borrows = sum(s.startswith("1") and len(s.split("-")[0]) == 2 for s in steps)
    return _finish("sub", f"{a}-{b}=", steps, a - b, 1 + (len(str(a)) > lo) + (borrows > 1))


def _gen_mul(rng: random.Random, lo: int, hi: int) -> Problem:
    # difficulty 1: one-digit multiplier; 2: two-digit multiplier; 3: both operands at max digits
    difficulty = rng.randint(1, 3)
    nb = 1 if difficulty == 1 else 2
    na = rng.randint(lo, hi) if difficulty < 3 else hi
    a = _digits(rng, na)
    b = rng.randint(2, 9) if nb == 1 else _digits(rng, nb)
    return _finish("mul", f"{a}*{b}=", mul_steps(a, b), a * b, difficulty)


def _gen_linear(rng: random.Random, lo: int, hi: int) -> Problem:
    difficulty = rng.randint(1, 3)
    xmax = 10 ** max(1, lo) - 1 if difficulty < 3 else 10 ** max(1, hi - 1) - 1
    x = rng.randint(1, max(2, xmax // 4)) if difficulty == 1 else rng.randint(-max(2, xmax // 4), max(2, xmax // 4))
    a = rng.randint(2, 9)
    if difficulty < 3:
        b = rng.randint(1, 10 ** max(1, lo) - 1) * rng.choice((1, -1))
        c = a * x + b
        prompt = f"{a}x{_signed(b)}={c} x="
        rhs = c - b
        op = "-" if b >= 0 else "+"
        steps = [f"{a}x={c}{op}{abs(b)}={rhs}", f"x={rhs}/{a}={x}"]
    else:
        a2 = rng.randint(1, a - 1)
        b = rng.randint(1, 10 ** max(1, lo) - 1)
        d = (a - a2) * x + b
        prompt = f"{a}x+{b}={_coef(a2)}x{_signed(d)} x="
        k, rhs = a - a2, d - b
        steps = [f"{a}x-{_coef(a2)}x={d}-{b}", f"{_coef(k)}x={rhs}"]
        if k != 1:
            steps.append(f"x={rhs}/{k}={x}")
    return _finish("linear", prompt, steps, x, difficulty)


_NAMES = (("Ann", "She"), ("Bob", "He"), ("Eva", "She"), ("Tom", "He"), ("Mia", "She"), ("Sam", "He"))
_ITEMS = ("pens", "apples", "cards", "coins", "books", "eggs")


def _gen_word(rng: random.Random, lo: int, hi: int) -> Problem:
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    n = _digits(rng, rng.randint(max(1, lo - 1), max(1, lo)))
    n = max(n, 2)
    form = rng.randint(0, 3)
    if form == 0:  # add
        m = rng.randint(2, 10**lo - 1)
        prompt = f"{name} has {n} {item}. {pron} gets {m} more. How many {item} now?"
        steps, ans, diff = [f"{n}+{m}={n + m}"], n + m, 1
    elif form == 1:  # sub
        m = rng.randint(1, n)
        prompt = f"{name} has {n} {item}. {pron} gives away {m}. How many {item} now?"
        steps, ans, diff = [f"{n}-{m}={n - m}"], n - m, 1
    elif form == 2:  # two steps: boxes then add
        k, e = rng.randint(2, 9), rng.randint(2, 12)
        prompt = f"{name} has {n} {item}. {pron} buys {k} boxes of {e} {item}. How many {item} now?"
        steps, ans, diff = [f"{k}*{e}={k * e}", f"{n}+{k * e}={n + k * e}"], n + k * e, 2
    else:  # three steps: boxes, gives away, share
        k, e = rng.randint(2, 9), rng.randint(2, 12)
        total = n + k * e
        g = rng.randint(1, total - 1)
        prompt = (f"{name} has {n} {item}. {pron} buys {k} boxes of {e} {item} and gives away {g}. "
                  f"How many {item} now?")
        steps = [f"{k}*{e}={k * e}", f"{n}+{k * e}={total}", f"{total}-{g}={total - g}"]
        ans, diff = total - g, 3
    return _finish("word", prompt, steps, ans, diff)


_GENERATORS: dict[str, Callable[[random.Random, int, int], Problem]] = {
    "add": _gen_add, "sub": _gen_sub, "mul": _gen_mul, "linear": _gen_linear, "word": _gen_word,
}


def make_problem(kind: str, rng: random.Random, min_digits: int = 2, max_digits: int = 3) -> Problem:
    """Draw one problem of ``kind`` with operands of ``min_digits``..``max_digits`` digits."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose from {list(KINDS)}")
    return _GENERATORS[kind](rng, min_digits, max_digits)


def restate(p: Problem) -> Problem:
    """The same problem with the solution restating the prompt first: ``<prompt> <steps> #### <answer>``."""
    if p.kind not in RESTATABLE_KINDS:
        raise ValueError(f"synthetic task: a {p.kind!r} problem cannot be restated (kinds {list(RESTATABLE_KINDS)})")
    return Problem(id=p.id, prompt=p.prompt, answer=p.answer, solution=f"{p.prompt} {p.solution}", kind=p.kind,
                   difficulty=p.difficulty)


def is_restated(response: str) -> bool:
    """Whether a response begins by restating an add/sub/mul problem: its first word ends with ``=``
    (``47+85=``); the first word of a direct solution is a step with its result (``7+5=12``) or the answer marker."""
    words = response.split(maxsplit=1)
    return bool(words) and words[0].endswith("=") and words[0] != "="


def _restate_some(problems: list[Problem], fraction: float, seed: int) -> list[Problem]:
    # per problem, from its id: the pick does not depend on the split's order or size
    return [restate(p) if fraction > 0 and random.Random(f"restate:{seed}:{p.id}").random() < fraction else p
            for p in problems]


def _draw(rng: random.Random, kinds: list[str], lo: int, hi: int, count: int, exclude: set[str],
          what: str) -> list[Problem]:
    out: list[Problem] = []
    seen = set(exclude)
    misses, max_misses = 0, 50 * count + 1000
    while len(out) < count:
        p = make_problem(kinds[len(out) % len(kinds)] if len(kinds) > 1 else kinds[0], rng, lo, hi)
        if p.id in seen:
            misses += 1
            if misses > max_misses:
                raise ValueError(
                    f"synthetic task: could only draw {len(out)} distinct {what} problems of {count} wanted "
                    f"(kinds={kinds}, digits {lo}..{hi}); lower data.synthetic.num_{what} or widen the digits")
            continue
        seen.add(p.id)
        out.append(p)
    rng.shuffle(out)
    return out


def make_splits(cfg=None, *, kinds: Optional[list[str]] = None, min_digits: Optional[int] = None,
                max_digits: Optional[int] = None, num_train: Optional[int] = None,
                num_test: Optional[int] = None, seed: Optional[int] = None,
                restate_fraction: Optional[float] = None) -> tuple[list[Problem], list[Problem]]:
    """Disjoint (by ``Problem.id``), seeded train and test splits.

    ``cfg`` is a ``SyntheticTaskConfig``; keyword arguments override its fields (or stand in for it).
    Kinds are interleaved evenly; within a kind, difficulty levels are mixed. The test split is drawn
    first, so it depends only on (kinds, digits, num_test, seed).
    """
    def pick(name, val, default):
        if val is not None:
            return val
        return getattr(cfg, name) if cfg is not None else default

    kinds = list(pick("kinds", kinds, ["add", "mul"]))
    lo, hi = pick("min_digits", min_digits, 2), pick("max_digits", max_digits, 3)
    n_train, n_test = pick("num_train", num_train, 4000), pick("num_test", num_test, 300)
    seed = pick("seed", seed, 1234)
    restate_fraction = float(pick("restate_fraction", restate_fraction, 0.0))
    if not kinds:
        raise ValueError("synthetic task: kinds is empty")
    bad = [k for k in kinds if k not in _GENERATORS]
    if bad:
        raise ValueError(f"synthetic task: unknown kinds {bad}; choose from {list(KINDS)}")
    if lo < 1 or hi < lo:
        raise ValueError(f"synthetic task: need 1 <= min_digits <= max_digits, got {lo}..{hi}")
    if not 0 <= restate_fraction <= 1:
        raise ValueError(f"synthetic task: restate_fraction={restate_fraction} must be in [0, 1]")
    if restate_fraction > 0 and set(kinds) - set(RESTATABLE_KINDS):
        raise ValueError(f"synthetic task: restate_fraction > 0 needs kinds among {list(RESTATABLE_KINDS)}, "
                         f"got {kinds}")
    # separate streams for test and train, both derived from the seed
    test = _draw(random.Random(f"test:{seed}"), kinds, lo, hi, n_test, set(), "test")
    train = _draw(random.Random(f"train:{seed}"), kinds, lo, hi, n_train, {p.id for p in test}, "train")
    return _restate_some(train, restate_fraction, seed), _restate_some(test, restate_fraction, seed)


def corpus_lines(problems: list[Problem]) -> list[str]:
    """Text lines for training the demo tokenizer: prompt + solution of each problem, a restated solution without its
    restatement: the variant keeps the plain task's tokenizer, so a model trained on the plain task reads it."""
    return [p.prompt + (p.solution[len(p.prompt) + 1:] if p.solution.startswith(p.prompt + " ") else p.solution)
            for p in problems]
