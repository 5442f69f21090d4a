"""pass@k and maj@k against brute-force enumeration of every k-subset (independent implementations)."""

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from megatron_amir.eval.passk import default_ks, maj_at_k, pass_at_k, pass_at_k_array


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (the first c correct) containing a correct sample."""
    hits = total = 0
    for subset in itertools.combinations(range(n), k):
        total += 1
        hits += any(i < c for i in subset)
    return Fraction(hits, total)


def brute_maj_at_k(answers, correct, k) -> Fraction:
    """Average over every k-subset of the vote credit: correct samples vote for the gold answer,
    wrong ones for their answer string, None abstains; a tie at the top shares the credit."""
    n = len(answers)
    total = Fraction(0)
    subsets = list(itertools.combinations(range(n), k))
    for subset in subsets:
        votes = {}
        for i in subset:
            if correct[i]:
                key = "GOLD"
            elif answers[i] is None:
                continue
            else:
                key = "W:" + answers[i].strip()
            votes[key] = votes.get(key, 0) + 1
        if "GOLD" not in votes:
            continue
        top = max(votes.values())
        if votes["GOLD"] == top:
            tied = sum(1 for v in votes.values() if v == top)
            total += Fraction(1, tied)
    return total / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(200, 100) ~ 9e58 and C(1000, 500) overflows float64: the product form must not form them
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5, abs=1e-12)
    for n, c, k in [(1000, 3, 500), (1000, 1, 1), (500, 250, 10), (64, 1, 32)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    # tiny probabilities keep their relative accuracy
    exact = 1 - Fraction(math.comb(999, 1), math.comb(1000, 1))
    assert pass_at_k(1000, 1, 1) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_1_is_fraction_correct_and_array_form():
    n = np.array([8, 8, 4, 5])
    c = np.array([0, 3, 4, 2])
    np.testing.assert_allclose(pass_at_k_array(n, c, 1), c / n, rtol=0, atol=1e-15)
    np.testing.assert_allclose(pass_at_k_array(n, c, 4), [pass_at_k(8, 0, 4), pass_at_k(8, 3, 4), 1.0,
                                                         pass_at_k(5, 2, 4)])


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 5), (4, 2, 0), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_default_ks():
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(1) == [1]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(16) == [1, 2, 4, 8, 16]


def test_maj_at_k_hand_example():
    # one correct sample, two wrong samples agreeing on "x"
    answers, correct = ["7", "x", "x"], [True, False, False]
    assert maj_at_k(answers, correct, 1) == pytest.approx(1 / 3)
    # pairs: {c, x} tie twice (credit 1/2 each), {x, x} loses: (1/2 + 1/2 + 0) / 3
    assert maj_at_k(answers, correct, 2) == pytest.approx(1 / 3)
    assert maj_at_k(answers, correct, 3) == 0.0
    # two spellings of the correct answer are one class, so they outvote one wrong answer
    assert maj_at_k(["1/2", "0.5", "3"], [True, True, False], 3) == 1.0
    # abstentions do not vote: one correct vote beats silence
    assert maj_at_k(["5", None, None, ""], [True, False, False, False], 4) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0


def test_maj_at_k_matches_enumeration_on_random_cases():
    rng = random.Random(7)
    pool = ["1", "2", "3", " 2", None]
    for _ in range(150):
        n = rng.randint(1, 8)
        answers = [rng.choice(pool) for _ in range(n)]
        correct = [rng.random() < 0.35 for _ in range(n)]
        for k in range(1, n + 1):
            got = maj_at_k(answers, correct, k)
            want = float(brute_maj_at_k(answers, correct, k))
            assert got == pytest.approx(want, abs=1e-12), (answers, correct, k)


def test_maj_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ValueError):
        maj_at_k(["1", "2"], [True, False], 3)
    with pytest.raises(ValueError):
        maj_at_k([], [], 1)
