"""Extraction and the fast exact reward (the synthetic task's reward)."""

import re
import time

import pytest

from megatron_amir.rewards import ExactReward, RewardResult, get_reward_fn
from megatron_amir.rewards.extract import (extract_answer, extract_boxed, extract_hash, extract_answer_is,
                                           normalize_answer, truncate)


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{42}", "42"),
    (r"\boxed{\frac{1}{2}} then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
    (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
    (r"\boxed{a_{b_{c_{d}}}}", r"a_{b_{c_{d}}}"),
    (r"\fbox{7}", "7"),
    (r"\boxed 5 apples", "5"),
    (r"\boxed{unclosed {", None),
    ("", None),
    (r"So x = \boxed{7}. (I put the final answer within \boxed{}.)", "7"),  # an empty box is not an answer
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_hash_answer_is_and_priority():
    assert extract_hash("a\n#### 72\n") == "72"
    assert extract_hash("#### 1\n#### 2") == "2"
    assert extract_hash("####   ") is None
    assert extract_hash("#### 7\n#### ") == "7"  # a stray empty marker does not hide the answer
    assert extract_answer_is("So the answer is 3.5. Done") == "3.5"
    assert extract_answer_is("The final answer is: $\\frac{1}{2}$.") == "$\\frac{1}{2}$"
    assert extract_answer_is("The answer is 12") == "12"
    assert extract_answer(r"The answer is 3. \boxed{4}") == "4"  # boxed wins
    assert extract_answer("#### 5\nThe answer is 6") == "5"
    assert extract_answer("no answer here 17") is None


def test_normalize():
    assert normalize_answer(" +007 ") == "7"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("1,000.50") == "1000.5" and normalize_answer("2,5") != "25"
    assert normalize_answer("-0") == "0"
    assert normalize_answer("$12$.") == "12"
    assert normalize_answer("2.50") == "2.5"
    assert normalize_answer("3.0") == "3"
    assert normalize_answer("132 7") != normalize_answer("1327")
    assert normalize_answer("1,00") == "1,00"  # not a thousands pattern: left alone


def test_truncate_keeps_tail_and_drops_nul():
    assert truncate("a" * 100 + "#### 5", 10) == "aaaa#### 5"
    assert truncate("1\x002", 10) == "12"


def test_exact_reward_scores_and_counts():
    fn = get_reward_fn("synthetic")
    assert isinstance(fn, ExactReward)
    res = fn(["7+5=12 #### 132", "#### 131", "7+5=12", "#### -4", "#### 0132", "#### 132 7"],
             ["132", "132", "132", "-4", "132", "132"])
    assert isinstance(res, RewardResult)
    assert res.correct == [True, False, False, True, True, False]
    assert res.rewards == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert res.format_ok == [True, True, False, True, True, True]
    assert res.timeouts == 0 and res.errors == 0
    fmt = get_reward_fn("exact", format_weight=0.1)
    assert fmt(["#### 1", "#### 2", "nothing"], ["1", "1", "1"]).rewards == [1.1, 0.1, 0.0]
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        fn(["a", "b"], ["1"])
    with pytest.raises(TypeError, match="responses\\[0\\]"):
        fn([None], ["1"])


def test_correct_weight_and_style_from_the_reward_config():
    from megatron_amir.config import ConfigError, RewardConfig, load_config

    # the paper's scale: 2 for a correct answer, 0.5 for the format
    paper = get_reward_fn("synthetic", RewardConfig(name="synthetic", correct_weight=2.0, format_weight=0.5))
    resp = ["47+85= 7+5=12 #### 132", "7+5=12 4+8+1=13 #### 132", "#### 131", "no answer"]
    assert paper(resp, ["132"] * 4).rewards == [2.5, 2.5, 0.5, 0.0]
    for style, correct in (("restated", [True, False, False, False]), ("direct", [False, True, False, False]),
                           ("any", [True, True, False, False])):
        res = get_reward_fn("exact", RewardConfig(name="exact", style=style))(resp, ["132"] * 4)
        assert res.correct == correct and res.rewards == [float(c) for c in correct]
        assert res.format_ok == [True, True, True, False]  # the style gates correctness, not the format
    with pytest.raises(ValueError, match="correct_weight must be > 0"):
        ExactReward(correct_weight=0.0)
    with pytest.raises(ValueError, match="reward.style"):
        ExactReward(style="long")
    with pytest.raises(ConfigError, match="reward.style"):
        load_config(None, ["reward.name=math", "reward.style=restated"])
    with pytest.raises(ConfigError, match="reward.correct_weight"):
        load_config(None, ["reward.correct_weight=0"])


class _OldStyleReward(ExactReward):
    """A user reward class written before correct_weight/style existed (no **kwargs)."""

    def __init__(self, format_weight=0.0, timeout_s=5.0, num_workers=2, memory_limit_mb=1024, max_answer_chars=2000):
        super().__init__(format_weight=format_weight)


def test_new_reward_fields_reach_user_classes_only_when_set():
    from megatron_amir.config import RewardConfig

    fn = get_reward_fn(f"{__name__}:_OldStyleReward", RewardConfig(name=f"{__name__}:_OldStyleReward"))
    assert fn(["#### 1"], ["1"]).rewards == [1.0]
    with pytest.raises(TypeError, match="correct_weight"):
        get_reward_fn(f"{__name__}:_OldStyleReward", RewardConfig(name="x:y", correct_weight=2.0))


def user_reward(responses, answers):
    return [float(len(r) == len(a)) for r, a in zip(responses, answers)]


def test_registry_dotted_paths_and_errors():
    fn = get_reward_fn("tests.test_rewards_exact:user_reward")
    res = fn(["ab", "abc"], ["xy", "xy"])
    assert res.rewards == [1.0, 0.0] and res.correct == [True, False]
    fn2 = get_reward_fn("megatron_amir.rewards.exact.ExactReward", format_weight=0.5)
    assert isinstance(fn2, ExactReward) and fn2.format_weight == 0.5
    with pytest.raises(ValueError, match="cannot import"):
        get_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="no attribute"):
        get_reward_fn("megatron_amir.rewards.exact:nope")
    with pytest.raises(ValueError, match="not a registered name"):
        get_reward_fn("unknownname")


def test_metrics_and_register():
    from megatron_amir.rewards import REGISTRY, register_reward

    res = get_reward_fn("exact")(["#### 1", "#### 2", "x"], ["1", "1", "1"])
    m = res.metrics()
    assert m["reward/mean"] == pytest.approx(1 / 3) and m["reward/accuracy"] == pytest.approx(1 / 3)
    assert m["reward/format_rate"] == pytest.approx(2 / 3) and m["reward/timeouts"] == 0.0
    register_reward("always_one", lambda **kw: get_reward_fn("tests.test_rewards_exact:user_reward"))
    try:
        assert get_reward_fn("always_one")(["ab"], ["cd"]).rewards == [1.0]
    finally:
        REGISTRY.pop("always_one")
    with pytest.raises(ValueError, match="plain word"):
        register_reward("a.b", ExactReward)


# --- normalization cases that once scored wrong: escaped dollar, Unicode minus, scientific notation, "answer is" ---

def test_normalize_escaped_dollar():
    assert normalize_answer(r"\$18") == "18"
    assert normalize_answer(r"\$ 18") == "18"
    assert normalize_answer(r"$\$18$") == "18"
    assert normalize_answer(r"\$1,000.50") == "1000.5"
    assert normalize_answer(r"\$18") != normalize_answer("19")
    fn = get_reward_fn("exact")
    res = fn([r"\boxed{\$18}", r"#### \$ 18", r"\boxed{\$18}"], ["18", "18", "19"])
    assert res.correct == [True, True, False]


def test_normalize_unicode_minus():
    for minus in "\u2212\u2012\u2013\u2014\u2015\ufe63\uff0d":
        assert normalize_answer(minus + "5") == "-5", hex(ord(minus))
        assert normalize_answer(minus + "0.50") == "-0.5"
    assert normalize_answer("\u22125") != normalize_answer("5")
    assert normalize_answer("\u22120") == "0"
    from megatron_amir.rewards.extract import fold_dashes

    assert fold_dashes("(\u20131, 2)") == "(-1, 2)" and fold_dashes("x = \u20135") == "x = -5"
    assert fold_dashes("3\u22125") == "3-5"  # the minus sign is a minus everywhere
    # a dash between two word characters is a range or a hyphen, not a minus (math-verify: 3-5 = -2)
    assert fold_dashes("3\u20135") == "3\u20135" and fold_dashes("well\u2014known") == "well\u2014known"
    fn = get_reward_fn("exact")
    res = fn(["#### \u22125", "#### \uff0d5", "#### \u20135", "#### \u22125", "#### 3\u20135"],
             ["-5", "-5", "-5", "5", "-2"])
    assert res.correct == [True, True, True, False, False]


def test_normalize_scientific_notation():
    assert normalize_answer("1e-07") == normalize_answer("0.0000001") == "0.0000001"
    assert normalize_answer("1E5") == normalize_answer("100000") == "100000"
    assert normalize_answer("2.5e3") == "2500" and normalize_answer("2.5E+3") == "2500"
    assert normalize_answer("-.5e2") == "-50" and normalize_answer("-0e5") == "0"
    assert normalize_answer("$1.50e-2$") == "0.015"
    assert normalize_answer("\u22121e-07") == "-0.0000001"
    assert normalize_answer("1e-07") != normalize_answer("1e-06")
    # out of range: never expanded (no million-digit string), equal only to the same string
    t0 = time.monotonic()
    for huge in ("1e999999", "1E999999", "1e-999999", "1e" + "9" * 100_000, "1" * 5000 + "e5"):
        out = normalize_answer(huge)
        assert len(out) <= len(huge) and "e" in out
    assert time.monotonic() - t0 < 1.0
    assert normalize_answer("1e999999") != normalize_answer("1" + "0" * 999_999)
    fn = get_reward_fn("exact")
    res = fn([r"\boxed{1e-07}", "#### 1E5", r"\boxed{2.5e3}", r"\boxed{1e-07}", r"\boxed{1e999999}"],
             ["0.0000001", "100000", "2500", "1e-06", "5"])
    assert res.correct == [True, True, True, False, False]


def test_plain_integer_normalization_unchanged():
    """The demo's reward: plain ASCII integers (and the strings around them) normalize exactly as before."""
    import random

    def old(s):  # the old integer branch of normalize_answer, kept as the reference it must agree with
        s = s.strip().rstrip(".").strip().strip("$").strip().rstrip(".").strip()
        if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", s):
            s = s.replace(",", "")
        neg, digits = s.startswith("-"), s.lstrip("+-").lstrip("0") or "0"
        return "-" + digits if neg and digits != "0" else digits

    rng = random.Random(0)
    for _ in range(5000):
        s = rng.choice(["", "-", "+"]) + "0" * rng.randrange(3) + str(rng.randrange(10 ** rng.randrange(1, 12)))
        s = rng.choice(["", " ", "$"]) + s + rng.choice(["", ".", " ", "$"])
        assert normalize_answer(s) == old(s), s


def test_answer_is_takes_the_last_statement():
    """Deliberately the last match (a restated/corrected answer wins), like \\boxed and ####, Qwen's math
    evaluation (split on "The answer is", last part) and lm-eval's flexible extraction."""
    assert extract_answer_is("The answer is 3. Wait, I made an error. The answer is 4.") == "4"
    assert extract_answer("First guess: the answer is 10.\nRechecking... The final answer is 12.") == "12"


def test_normalize_linear_on_long_digit_strings():
    """No regex backtracking blow-up: a failed numeric fullmatch on a long digit string used to be quadratic
    (``\\d+\\.?\\d*``), and a scientific-notation check must not add one."""
    t0 = time.monotonic()
    for s in ("9" * 200_000 + "x", "9" * 200_000 + "e", "9" * 100_000 + ".5x", "1" + "0" * 999_999,
              "9" * 100_000 + "e" + "9" * 100_000 + "x", "\u2013" * 100_000 + "5"):
        normalize_answer(s)
    assert time.monotonic() - t0 < 2.0
