"""Unbiased pass@k and majority-vote maj@k estimators from n samples per problem.

Both are *expectations over the k-subsets* of the n samples drawn for one problem, so a run with
n = 8 samples reports pass@1, pass@2, pass@4 and pass@8 from the same generations without the
optimistic bias of "any of the first k" (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code", eq. 1).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Hashable, Optional, Sequence

import numpy as np


def _check(n: int, c: int, k: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise TypeError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct samples is outside [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is outside [1, n={n}]: pass@k needs at least k samples")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k).

    The probability that a uniformly random k-subset of the n samples contains at least one of the c
    correct ones. Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the
    binomials (C(200, 100) overflows float64) and stays accurate when the answer is near 0 or 1.
    """
    _check(n, c, k)
    if n - c < k:  # every k-subset must contain a correct sample
        return 1.0
    # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (i-k)/i
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def pass_at_k_array(n: Sequence[int] | np.ndarray, c: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """pass_at_k for many problems at once; n and c are per-problem arrays of equal length."""
    n_arr, c_arr = np.asarray(n), np.asarray(c)
    if n_arr.shape != c_arr.shape:
        raise ValueError(f"n and c must have the same shape, got {n_arr.shape} and {c_arr.shape}")
    return np.array([pass_at_k(int(a), int(b), k) for a, b in zip(n_arr.ravel(), c_arr.ravel())],
                    dtype=np.float64).reshape(n_arr.shape)


def default_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... <= n, plus n itself when n is not a power of two."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample")
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


# --------------------------------------------------------------------------------------------- maj@k
CORRECT_CLASS = "<correct>"


def vote_keys(answers: Sequence[Optional[str]], correct: Sequence[bool]) -> list[Optional[Hashable]]:
    """The class each sample votes for.

    Every correct sample votes for one class (the gold answer: "1/2" and "0.5" are the same answer to
    a verifier, so splitting them would let one wrong string outvote two spellings of the truth);
    an incorrect sample votes for its extracted answer string; a sample without an extracted answer
    (None or empty) abstains.
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) differ in length")
    keys: list[Optional[Hashable]] = []
    for a, ok in zip(answers, correct):
        if ok:
            keys.append(CORRECT_CLASS)
        elif a is None or (isinstance(a, str) and not a.strip()):
            keys.append(None)
        else:
            keys.append(("wrong", str(a).strip()))
    return keys


def maj_at_k(answers: Sequence[Optional[str]], correct: Sequence[bool], k: int) -> float:
    """Expected correctness of a majority vote over a uniformly random k-subset of the n samples.

    maj@k = E_S[ credit(S) ], S uniform over the C(n, k) subsets of size k, where credit(S) is 1 when
    the correct class has strictly more votes in S than every wrong answer, 1/(t+1) when it ties with
    t wrong answers at the top (a fair coin among the tied), and 0 otherwise (also when no sample in S
    is correct). Abstaining samples (no extracted answer) take a slot but cast no vote.

    Exact, no enumeration: for each number x >= 1 of correct samples in S, a dynamic program over the
    wrong-answer classes counts the ways to fill the other k - x slots with every wrong class at most
    x, tracking how many classes tie at x. Integer arithmetic, so C(n, k) never rounds.
    """
    keys = vote_keys(answers, correct)
    n = len(keys)
    if n == 0:
        raise ValueError("maj_at_k needs at least one sample")
    _check(n, 0, k)
    counts: dict[Hashable, int] = {}
    for key in keys:
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    m_correct = counts.pop(CORRECT_CLASS, 0)
    if m_correct == 0:
        return 0.0
    wrong = list(counts.values())
    abstain = sum(1 for key in keys if key is None)

    total = Fraction(0)
    for x in range(1, min(m_correct, k) + 1):
        rest = k - x
        # ways[j][t]: ways to pick j samples from the classes seen so far with t classes tied at x
        ways = [[0] * (len(wrong) + 1) for _ in range(rest + 1)]
        ways[0][0] = 1
        for m in wrong:
            new = [[0] * (len(wrong) + 1) for _ in range(rest + 1)]
            for j in range(rest + 1):
                for t in range(len(wrong) + 1):
                    w = ways[j][t]
                    if not w:
                        continue
                    for y in range(0, min(m, x, rest - j) + 1):
                        new[j + y][t + (y == x)] += w * math.comb(m, y)
            ways = new
        base = math.comb(m_correct, x)
        for j in range(rest + 1):
            fill_abstain = math.comb(abstain, rest - j)  # the remaining slots go to abstainers
            if not fill_abstain:
                continue
            for t in range(len(wrong) + 1):
                if ways[j][t]:
                    total += Fraction(base * ways[j][t] * fill_abstain, t + 1)
    return float(total / math.comb(n, k))
