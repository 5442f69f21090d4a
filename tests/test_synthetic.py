"""Synthetic task: answers checked against Python integer arithmetic re-derived from the prompt text,
scratchpad steps each re-checked, splits disjoint and deterministic, lengths varying."""

import random
import re

import pytest

from megatron_amir.config import SyntheticTaskConfig
from megatron_amir.data.synthetic import KINDS, corpus_lines, is_restated, make_problem, make_splits
from megatron_amir.rewards.extract import extract_answer


def _reference_answer(p):
    """Independent solution from the prompt text (no eval)."""
    if p.kind in ("add", "sub", "mul"):
        a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)=", p.prompt).groups()
        a, b = int(a), int(b)
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    if p.kind == "linear":
        m = re.fullmatch(r"(\d+)x([+-]\d+)=(-?\d*)(x?)([+-]\d+)? x=", p.prompt)
        assert m, p.prompt
        a, b = int(m.group(1)), int(m.group(2))
        if m.group(4):  # a x + b = c x + d
            c = {"": 1, "-": -1}.get(m.group(3), None)
            c = int(m.group(3)) if c is None else c
            d = int(m.group(5))
            x, r = divmod(d - b, a - c)
        else:
            x, r = divmod(int(m.group(3)) - b, a)
        assert r == 0
        return x
    nums = [int(v) for v in re.findall(r"\d+", p.prompt)]
    if "gets" in p.prompt:
        return nums[0] + nums[1]
    if "boxes" in p.prompt and "gives away" in p.prompt:
        return nums[0] + nums[1] * nums[2] - nums[3]
    if "boxes" in p.prompt:
        return nums[0] + nums[1] * nums[2]
    return nums[0] - nums[1]


def _check_step(step):
    """Every scratchpad step 'lhs=rhs' (possibly chained lhs=mid=rhs) holds in integer arithmetic."""
    parts = step.split("=")
    if "x" in step:  # linear steps: check the purely numeric chain after the part with the unknown
        parts = [q for q in parts if "x" not in q]
        if len(parts) < 2:
            return
    vals = []
    for part in parts:
        toks = re.findall(r"\d+|[+\-*/]", part)
        # left-to-right with * and / binding tighter, no eval
        terms, sign, i = [], 1, 0
        if toks and toks[0] == "-":
            sign, i = -1, 1
        cur = int(toks[i]); i += 1
        while i < len(toks):
            op, v = toks[i], int(toks[i + 1]); i += 2
            if op == "*":
                cur *= v
            elif op == "/":
                assert cur % v == 0
                cur //= v
            else:
                terms.append(sign * cur)
                sign, cur = (1 if op == "+" else -1), v
        terms.append(sign * cur)
        vals.append(sum(terms))
    assert len(set(vals)) == 1, (step, vals)


@pytest.mark.parametrize("kind", KINDS)
def test_answers_and_steps_correct(kind):
    rng = random.Random(7)
    for _ in range(300):
        p = make_problem(kind, rng, 2, 3)
        assert int(p.answer) == _reference_answer(p), p
        assert extract_answer(p.solution) == p.answer
        assert p.solution.endswith(f"#### {p.answer}")
        for step in p.solution.split(" #### ")[0].split(" "):
            _check_step(step)
        assert 1 <= p.difficulty <= 3
        assert p.id == f"{kind}:{p.prompt}"


def test_splits_disjoint_deterministic_and_test_independent_of_train_size():
    cfg = SyntheticTaskConfig(kinds=list(KINDS), num_train=1500, num_test=200, seed=5)
    tr, te = make_splits(cfg)
    assert len(tr) == 1500 and len(te) == 200
    assert not {p.id for p in tr} & {p.id for p in te}
    assert len({p.id for p in tr}) == len(tr)
    tr2, te2 = make_splits(cfg)
    assert tr == tr2 and te == te2
    _, te3 = make_splits(cfg, num_train=700)
    assert te3 == te
    tr4, _ = make_splits(cfg, seed=6)
    assert [p.id for p in tr4] != [p.id for p in tr]
    assert {p.kind for p in tr} == set(KINDS)


def test_lengths_and_difficulties_vary_within_kind():
    tr, _ = make_splits(kinds=list(KINDS), num_train=1000, num_test=10, seed=1)
    for kind in KINDS:
        ps = [p for p in tr if p.kind == kind]
        assert len({len(p.solution) for p in ps}) >= 5, kind
        assert len({p.difficulty for p in ps}) >= 2, kind


def test_too_many_problems_for_the_space_is_a_clear_error():
    with pytest.raises(ValueError, match="num_train"):
        make_splits(kinds=["add"], min_digits=1, max_digits=1, num_train=200, num_test=10)
    with pytest.raises(ValueError, match="unknown kinds"):
        make_splits(kinds=["div"], num_train=1, num_test=1)


def test_restated_variant_marks_a_hashed_fraction_and_keeps_the_problems():
    plain_train, plain_test = make_splits(kinds=["add", "sub", "mul"], num_train=2000, num_test=200, seed=7)
    train, test = make_splits(kinds=["add", "sub", "mul"], num_train=2000, num_test=200, seed=7, restate_fraction=0.3)
    # same problems in the same order; only the solutions of the picked ones change
    assert [p.id for p in train] == [p.id for p in plain_train] and [p.id for p in test] == [p.id for p in plain_test]
    picked = [p for p, q in zip(train, plain_train) if p.solution != q.solution]
    assert 0.25 < len(picked) / len(train) < 0.35
    for p, q in zip(train, plain_train):
        if p.solution != q.solution:
            assert p.solution == f"{p.prompt} {q.solution}" and is_restated(p.solution)
        else:
            assert not is_restated(p.solution)
        assert extract_answer(p.solution) == p.answer == str(_reference_answer(p))
    # the pick belongs to the problem, not to its position or the split size
    bigger, _ = make_splits(kinds=["add", "sub", "mul"], num_train=2500, num_test=200, seed=7, restate_fraction=0.3)
    by_id = {p.id: p.solution for p in bigger}
    assert all(by_id[p.id] == p.solution for p in train if p.id in by_id)
    # the tokenizer corpus is the plain task's (the variant runs on a model trained with the plain tokenizer)
    assert corpus_lines(train) == corpus_lines(plain_train)
    # and changes with the seed
    _, test2 = make_splits(kinds=["add", "sub", "mul"], num_train=10, num_test=200, seed=8, restate_fraction=0.3)
    assert [is_restated(p.solution) for p in test2] != [is_restated(p.solution) for p in test]


@pytest.mark.parametrize("text,restated", [
    ("47+85= 7+5=12 4+8+1=13 #### 132", True), ("82-35= 12-5=7 #### 47", True), ("7+5=12 #### 12", False),
    ("#### 132", False), ("", False), ("= 3", False), ("47*6=282 #### 282", False), ("47*36= 47*6=282", True),
])
def test_is_restated(text, restated):
    assert is_restated(text) is restated


def test_restated_variant_rejects_kinds_it_cannot_restate():
    with pytest.raises(ValueError, match="restate_fraction"):
        make_splits(kinds=["add", "word"], num_train=10, num_test=10, restate_fraction=0.5)
    with pytest.raises(ValueError, match="restate_fraction"):
        SyntheticTaskConfig(kinds=["linear"], restate_fraction=0.5)
    assert SyntheticTaskConfig(kinds=["linear"]).restate_fraction == 0.0
