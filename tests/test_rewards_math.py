"""The sandboxed math-verify reward: >= 40 equivalence cases across formats, >= 10 adversarial outputs
each finishing within its limit, and a pool that survives hanging, crashing and memory-hungry workers."""

import os
import time

import pytest

from megatron_amir.rewards import get_reward_fn
from megatron_amir.rewards.pool import SandboxPool

# (gold answer, model response, mathematically equivalent?)
CASES = [
    (r"\frac{1}{2}", r"\boxed{0.5}", True),
    (r"\frac{1}{2}", r"\boxed{1/2}", True),
    (r"\frac12", r"\boxed{\dfrac{1}{2}}", True),
    ("0.5", r"The answer is $\frac{1}{2}$.", True),
    ("(1,2)", r"\boxed{(1, 2)}", True),
    (r"\{1,2\}", r"\boxed{\{2,1\}}", True),
    ("[0,1)", r"\boxed{[0, 1)}", True),
    (r"\sqrt{8}", r"\boxed{2\sqrt{2}}", True),
    ("3", r"\boxed{x=3}", True),
    ("1000", "#### 1,000", True),
    ("1000", r"\boxed{1{,}000}", True),
    (r"\pi", r"\boxed{\pi}", True),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\sqrt{3}/2}", True),
    ("a+b", r"\boxed{b+a}", True),
    ("5", r"\boxed{\text{5}}", True),
    (r"90^\circ", r"\boxed{90}", True),
    (r"\infty", r"\boxed{\infty}", True),
    ("-3", "#### -3", True),
    ("2.50", r"\boxed{2.5}", True),
    ("72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", True),
    ("x^2+2x+1", r"\boxed{(x+1)^2}", True),
    (r"\frac{3}{4}", r"\boxed{0.75}", True),
    (r"2\sqrt{3}", r"\boxed{\sqrt{12}}", True),
    (r"\frac{\pi}{3}", r"\boxed{\frac{\pi}{3}}", True),
    ("4", r"\boxed{2+2}", True),
    ("1/2", r"\boxed{2/4}", True),
    (r"\frac{1}{2}", "#### 0.5", True),
    ("3", "The final answer is 3.", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \frac{\pi}{2})}", True),
    (r"x \in [2, 5]", r"\boxed{[2,5]}", True),
    (r"\dfrac{9}{7}", r"\boxed{\frac{9}{7}}", True),
    (r"\$18.90", r"\boxed{18.9}", True),
    ("10", r"\boxed{10\text{ cm}}", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", True),
    ("[0,1)", r"\boxed{(0,1]}", False),
    ("2", r"\boxed{3}", False),
    ("0.333", r"\boxed{1/3}", False),
    (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}", False),
    (r"\sqrt{2}", r"\boxed{2}", False),
    ("72", "#### 73", False),
    ("72", "so it is 72", False),  # no final-answer marker: not credited
    ("5", "The answer is 6.", False),
    ("x^2", r"\boxed{x^3}", False),
    (r"\{1,2\}", r"\boxed{\{1,3\}}", False),
    ("1000", r"\boxed{100}", False),
    ("-3", r"\boxed{3}", False),
    ("12", r"\boxed{12", False),  # unclosed box
    ("(1,2)", r"\boxed{(1,3)}", False),
    (r"\frac{9}{7}", r"\boxed{\frac{7}{9}}", False),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}", False),
    ("a+b", r"\boxed{a-b}", False),
    ("1.5", r"\boxed{1.05}", False),
    ("3", r"\boxed{x=4}", False),
    (r"-\dfrac{3}{4}", r"\boxed{-0.75}", True),
    (r"\frac{2}{3}", "#### 4/6", True),
    (r"\frac{2}{3}", r"\boxed{\frac{3}{2}}", False),
    ("0.25", r"\boxed{\frac{1}{4}}", True),
]

TIMEOUT = 2.0
GRACE = 0.5

ADVERSARIAL = [
    r"\boxed{9**9**9**9}",
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{10^{10^{10}}}",
    r"\boxed{(10^{100})!}",
    r"\boxed{" + r"\frac{1}{2}+" * 90_000 + "1}",  # ~1 MB of LaTeX
    r"\boxed{" + "{" * 50_000 + "1" + "}" * 50_000 + "}",  # deeply nested braces
    "\\boxed{1\x002}" + "\x00" * 10_000,  # NUL bytes
    r"\boxed{__import__('os').system('touch /tmp/megatron_amir_pwned')}",
    r"\boxed{" + r"\sqrt{" * 3000 + "2" + "}" * 3000 + "}",
    r"\boxed{" + "x^" * 5000 + "2}",
    "#### " + "9" * 100_000,  # a 100k-digit integer
    r"\boxed{1}" * 100_000,  # many boxes
    "\ud800\udfff broken surrogates \\boxed{\ud800}",
    r"\boxed{\int_0^\infty e^{-x^{100}} \, dx \cdot \sum_{n=1}^{10^{10}} n^{n}}",
    # inputs that survive truncation whole (<= max_answer_chars), so the parser really sees them
    r"\boxed{" + "{" * 900 + "1" + "}" * 900 + "}",
    r"\boxed{" + r"\frac{1}{3}+" * 150 + "1}",
    r"\boxed{" + "(" * 600 + "1" + ")" * 600 + "}",
]


@pytest.fixture(scope="module")
def math_fn():
    fn = get_reward_fn("math", timeout_s=TIMEOUT, num_workers=2, memory_limit_mb=1024, grace_s=GRACE)
    yield fn
    fn.close()


def test_verification_cases(math_fn):
    assert len(CASES) >= 40
    res = math_fn([c[1] for c in CASES], [c[0] for c in CASES])
    wrong = [(c, ex) for c, ok, ex in zip(CASES, res.correct, res.extracted) if ok != c[2]]
    assert not wrong, wrong
    assert res.rewards == [float(c[2]) for c in CASES]
    assert res.timeouts == 0 and res.errors == 0
    # the slow path really ran (not only the string fast path)
    assert math_fn.stats["pool_calls"] >= 25


def test_same_cases_without_fast_path_agree():
    fn = get_reward_fn("math", timeout_s=TIMEOUT, num_workers=2, fast_path=False)
    try:
        res = fn([c[1] for c in CASES], [c[0] for c in CASES])
        assert res.correct == [c[2] for c in CASES]
        assert fn.stats["fast_path"] == 0
    finally:
        fn.close()


def test_adversarial_outputs_bounded(math_fn):
    assert len(ADVERSARIAL) >= 10
    if os.path.exists("/tmp/megatron_amir_pwned"):
        os.unlink("/tmp/megatron_amir_pwned")
    golds = ["2"] * len(ADVERSARIAL)  # no adversarial output equals 2
    t0 = time.monotonic()
    res = math_fn(ADVERSARIAL, golds)
    wall = time.monotonic() - t0
    assert res.correct == [False] * len(ADVERSARIAL)
    assert not os.path.exists("/tmp/megatron_amir_pwned")
    # every pool call ended within its hard limit (alarm or kill), checked per call below;
    # the whole batch is bounded by calls / workers * limit (plus restarts)
    hard = math_fn.pool.hard_limit_s  # wall bound per call: 2 x TIMEOUT (CPU limit) + GRACE
    bound = (len(ADVERSARIAL) / 2 + 2) * hard + 10
    assert wall < bound, (wall, bound, res.timeouts)
    # the pool is still healthy: a normal batch still verifies
    ok = math_fn([r"\boxed{\frac{2}{4}}", "#### 7"], [r"\frac12", "8"])
    assert ok.correct == [True, False]


def test_each_adversarial_call_within_hard_limit():
    """Per-call timing straight from the pool (answers as extracted and truncated by the reward)."""
    from megatron_amir.rewards.extract import extract_answer, truncate

    with SandboxPool(2, timeout_s=1.0, memory_limit_mb=1024, grace_s=GRACE,
                     preload=("megatron_amir.rewards.math_worker",)) as pool:
        args = []
        for text in ADVERSARIAL:
            ans = extract_answer(truncate(text, 16_000))
            if ans:
                args.append(("2", truncate(ans, 2000), 6))
        results = pool.map("megatron_amir.rewards.math_worker:verify_answer", args)
        for a, r in zip(args, results):
            assert r.elapsed_s <= pool.hard_limit_s + 1.0, (a[1][:60], r)
            assert r.status in ("ok", "timeout", "error")
            assert r.value in (None, False), (a[1][:60], r)
        assert any(r.status == "timeout" for r in results)  # the towers of powers do hit the limit


def test_timeout_counted_and_scored_zero():
    fn = get_reward_fn("math", timeout_s=1.0, num_workers=1, grace_s=0.3)
    try:
        res = fn([r"\boxed{(10^{100})!}", r"\boxed{\frac{1}{2}}"], ["5", "0.5"])
        assert res.correct == [False, True]
        assert res.rewards == [0.0, 1.0]
        assert res.timeouts == 1 and res.errors == 0
    finally:
        fn.close()


def test_pool_survives_hang_crash_and_memory_blowup():
    with SandboxPool(1, timeout_s=1.0, memory_limit_mb=512, grace_s=0.3, wall_factor=2.0) as pool:
        pid0 = pool.pids()[0]
        # an interruptible hang: the worker's wall-clock alarm (2 x 1 s) ends it, the worker survives
        r = pool.map("time:sleep", [(30,), (0.01,)])
        assert [x.status for x in r] == ["timeout", "ok"]
        assert 1.9 < r[0].elapsed_s < 3.0
        # a CPU-bound pure-Python loop (timeit's compiled `for` loop): the CPU-time alarm (1 s) ends it
        r = pool.map("timeit:timeit", [("pass", "pass", time.perf_counter, 10**12)])
        assert r[0].status == "timeout" and r[0].elapsed_s < 3.0
        assert pool.pids()[0] == pid0 and pool.restarts == 0
        # a hang the alarm cannot end (SIGALRM blocked): the parent kills and replaces the worker,
        # and the calls queued behind it in the same chunk still run
        import signal

        r = pool.map("signal:pthread_sigmask", [(signal.SIG_BLOCK, [signal.SIGALRM])])
        assert r[0].status == "ok"
        t0 = time.monotonic()
        r = pool.map("time:sleep", [(30,), (0.01,), (0.01,)])
        assert [x.status for x in r] == ["timeout", "ok", "ok"]
        assert time.monotonic() - t0 < 2 * pool.hard_limit_s
        assert pool.restarts == 1 and pool.pids()[0] != pid0
        # a crash: error for that call, fresh worker for the rest
        r = pool.map("os:_exit", [(7,)])
        assert r[0].status == "error" and "died" in r[0].error
        assert pool.restarts == 2
        r = pool.map("os:abort", [()])
        assert r[0].status == "error"
        # the memory limit turns a 2 GiB allocation into a counted error, the worker lives on
        r = pool.map("builtins:bytearray", [(2 * 1024**3,), (8,)])
        assert r[0].status == "error" and "memory" in r[0].error
        assert r[1].status == "ok" and r[1].value == bytearray(8)
        # ordinary exceptions are errors with the reason
        r = pool.map("builtins:int", [("nope",), ("12",)])
        assert r[0].status == "error" and "ValueError" in r[0].error and r[1].value == 12


def test_pool_results_in_order_across_workers():
    with SandboxPool(2, timeout_s=2.0, chunk_size=3) as pool:
        r = pool.map("builtins:abs", [(-i,) for i in range(50)])
        assert [x.value for x in r] == list(range(50))
        assert {x.status for x in r} == {"ok"}


def test_format_weight_and_cache(math_fn):
    fn = get_reward_fn("math", timeout_s=TIMEOUT, num_workers=1, format_weight=0.2)
    try:
        res = fn([r"\boxed{0.5}", r"\boxed{3}", "no marker 0.5"], [r"\frac12", r"\frac12", r"\frac12"])
        assert res.rewards == [1.2, 0.2, 0.0]
        calls = fn.stats["pool_calls"]
        fn([r"\boxed{0.5}"] * 8, [r"\frac12"] * 8)
        assert fn.stats["pool_calls"] == calls  # cached per (gold, answer)
    finally:
        fn.close()


def test_workers_do_not_reimport_the_main_script(tmp_path):
    """A trainer script's top level (e.g. `import torch`) must not run again in every reward worker."""
    import subprocess
    import sys
    from pathlib import Path

    marker = tmp_path / "marker"
    script = tmp_path / "main_script.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(marker)!r}, 'a').write('imported\\n')\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from megatron_amir.rewards.pool import SandboxPool\n"
        "if __name__ == '__main__':\n"
        "    with SandboxPool(2, timeout_s=2) as p:\n"
        "        print([r.status for r in p.map('os:getpid', [()] * 4)])\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['ok', 'ok', 'ok', 'ok']" in out.stdout
    assert marker.read_text().count("imported") == 1


def test_cut_answer_is_never_correct():
    """An answer longer than max_answer_chars is cut to its tail for the record, never scored: the tail of
    '1000…005' or '-000…005' would otherwise equal '5'."""
    from megatron_amir.rewards.math_reward import MathReward

    fn = MathReward(max_answer_chars=50, num_workers=1)
    try:
        res = fn(["\\boxed{1" + "0" * 60 + "5}", "\\boxed{-" + "0" * 60 + "5}", "\\boxed{5}"], ["5", "5", "5"])
        assert res.correct == [False, False, True]
    finally:
        fn.close()


def test_transient_worker_failure_is_not_cached():
    """A worker crash or wall-clock kill may be transient: the next batch verifies the pair again."""
    from megatron_amir.rewards.math_reward import MathReward
    from megatron_amir.rewards.pool import CallResult

    class FlakyPool:
        calls = 0

        def map(self, fn, args):
            FlakyPool.calls += 1
            return [CallResult("error", None, "worker died") if FlakyPool.calls == 1 else CallResult("ok", True)
                    for _ in args]

        def close(self):
            pass

    fn = MathReward()
    fn._pool = FlakyPool()
    got = [fn(["\\boxed{2\\sqrt{2}}"], ["\\sqrt{8}"]) for _ in range(3)]
    assert [r.correct for r in got] == [[False], [True], [True]] and got[0].errors == 1
    assert FlakyPool.calls == 2  # the ok result is cached


# answers that once scored wrong: escaped dollar, Unicode minus/dashes, scientific notation (gold, response, correct?)
REVIEW_CASES = [
    ("18", r"\boxed{\$18}", True),
    ("18", r"The answer is \$ 18.", True),
    (r"\$18.90", r"\boxed{\$18.9}", True),
    ("19", r"\boxed{\$18}", False),
    ("-5", "#### \u22125", True),
    ("-5", "#### \u20135", True),
    ("-5", "#### \uff0d5", True),
    ("-5", "#### \ufe635", True),
    ("\u22125", "#### -5", True),
    (r"-\frac{\sqrt{3}}{2}", "\\boxed{\uff0d\\frac{\\sqrt{3}}{2}}", True),
    (r"-\sqrt{2}", "\\boxed{\u2013\\sqrt{8}/2}", True),  # goes to math-verify with the dash folded
    ("5", "#### \u22125", False),
    ("-2", "#### 3\u20135", False),  # an en dash between numbers is a range, not 3 - 5
    ("0.0000001", r"\boxed{1e-07}", True),
    ("1e-07", r"\boxed{0.0000001}", True),
    ("100000", r"\boxed{1E5}", True),
    ("2500", r"\boxed{2.5e3}", True),
    ("2500", r"\boxed{2.5E+03}", True),
    ("-0.0000001", "#### \u22121e-7", True),
    (r"\frac{1}{2}", r"\boxed{5e-1}", True),
    ("6.02e23", r"\boxed{602000000000000000000000}", True),
    (r"10^{-7}", r"\boxed{1e-07}", True),  # math-verify, the answer written as 1\times10^{-7}
    (r"10^{-7}", r"\boxed{2e-07}", False),
    ("1e-06", r"\boxed{1e-07}", False),
    ("1e-07", r"\boxed{2e-07}", False),  # no rounding to 6 decimals for scientific notation
    ("0.0000002", r"\boxed{1e-07}", False),
    ("2500", r"\boxed{2.5e4}", False),
    ("5", r"\boxed{1e999999}", False),
    (r"\infty", r"\boxed{1e999999}", False),
    ("1" + "0" * 999, r"\boxed{1e999}", True),  # within range: exact
    ("1e999999", r"\boxed{1e999999}", True),  # out of range: only the same string
    ("1e999999", r"\boxed{1e999998}", False),
    ("1", r"\boxed{1e" + "0" * 1500 + "}", False),  # over-long exponent, never evaluated
]


def _review_check(fn):
    res = fn([c[1] for c in REVIEW_CASES], [c[0] for c in REVIEW_CASES])
    wrong = [(c[0][:30], c[1][:30], ex) for c, ok, ex in zip(REVIEW_CASES, res.correct, res.extracted) if ok != c[2]]
    assert not wrong, wrong
    assert res.timeouts == 0 and res.errors == 0
    return res


def test_review_cases(math_fn):
    calls = math_fn.stats["pool_calls"]
    _review_check(math_fn)
    # only the non-number pairs (-\sqrt{2}, 10^{-7} twice, the range 3–5) reached the pool; the scientific
    # numbers, in range or not, were decided in the parent
    assert math_fn.stats["pool_calls"] - calls == 4
    assert math_fn.stats["scientific"] >= 16


def test_review_cases_without_fast_path_agree():
    fn = get_reward_fn("math", timeout_s=TIMEOUT, num_workers=2, fast_path=False)
    try:
        _review_check(fn)
        assert fn.stats["fast_path"] == 0
    finally:
        fn.close()


def test_escaped_dollar_and_unicode_minus_decided_in_parent():
    fn = get_reward_fn("math", timeout_s=TIMEOUT, num_workers=1)
    try:
        res = fn([r"\boxed{\$18}", r"\boxed{\$ 18}", r"\boxed{\$18}", "#### \u22125", "#### \u20135", "#### \u22125"],
                 ["18", "18", "19", "-5", "-5", "5"])
        assert res.correct == [True, True, False, True, True, False]
        assert fn.stats["pool_calls"] == 0 and fn._pool is None  # no math-verify needed
    finally:
        fn.close()


def test_huge_exponent_bounded_and_never_correct():
    fn = get_reward_fn("math", timeout_s=TIMEOUT, num_workers=1)
    try:
        huge = [r"\boxed{1e999999}", r"\boxed{-1E999999999}", r"\boxed{1e-999999}", "#### 9e" + "9" * 1900,
                r"\boxed{" + "9" * 1500 + "e5}"]
        t0 = time.monotonic()
        res = fn(huge, ["5", "-1", "0", "1", "1"])
        assert time.monotonic() - t0 < 1.0
        assert res.correct == [False] * len(huge)
        assert fn.stats["pool_calls"] == 0 and fn.stats["scientific"] == len(huge)
    finally:
        fn.close()


def test_euler_e_against_a_symbolic_gold_is_not_scientific_notation(math_fn):
    """``2e-1`` is 2·10⁻¹ only against a numeric gold; against a symbolic one it may be 2e − 1 (Euler's e), and
    math-verify decides on the strings as written (as before scientific notation was read)."""
    pairs = [("2e-1", "2e - 1"), ("2e-1", "-1+2e"), ("3e+1", "3e + 1"), ("2e+2", "2(e+1)"), ("4e-4", "4(e-1)"),
             ("2e-1", "0.2"), ("1e-07", "0.0000001"), ("2e-1", "2e - 2")]
    out = math_fn([f"\\boxed{{{a}}}" for a, _ in pairs], [g for _, g in pairs])
    assert list(out.correct) == [True, True, True, True, True, True, True, False]


def test_answer_form_number_refuses_expressions_that_evaluate_to_the_gold():
    """The loophole a policy learned on SmolLM2 (docs/real_model.md): "The answer is 86 - 0" for 86. With
    answer_form=number only an answer that is itself a number counts; every form of a number still does."""
    responses = ["The answer is 86 - 0.", "The answer is 80 + 6", r"\boxed{2 \cdot 43}", "The answer is 86 apples.",
                 "The answer is 86.", r"\boxed{\frac{172}{2}}", "The answer is 8.6e1.", "#### 86.0", "The answer is 85."]
    loose, strict = get_reward_fn("math", num_workers=1), get_reward_fn("math", num_workers=1, answer_form="number")
    try:
        assert loose(responses, ["86"] * len(responses)).correct == [True] * 8 + [False]
        assert strict(responses, ["86"] * len(responses)).correct == [False] * 4 + [True] * 4 + [False]
    finally:
        loose.close()
        strict.close()
    with pytest.raises(ValueError, match="reward.answer_form: unknown 'expression'"):
        get_reward_fn("math", answer_form="expression")
