"""Reward throughput on typical math answers: verifications per second.

Rows:
- ``math-verify sequential``: the baseline, one process calling ``math_verify.parse``/``verify`` per
  item with its default (signal) timeouts, as a single-process trainer would.
- ``MathReward pool (no fast path)``: the same items through ``MathReward`` with the string/number fast
  path and the result cache off, so every item is a math-verify call in the sandbox pool
  (``--workers`` processes, hard time/memory limits). The ratio on the last line is this row / the baseline.
- ``MathReward default``: fast path + cache on, on GRPO-shaped batches (groups of G=8 answers per
  problem, several identical) — what training sees.
- ``ExactReward``: the synthetic demo's in-process exact match.

Items are distinct (gold, response) pairs (integers, decimals, fractions, roots, intervals, tuples,
sets, expressions; about half equivalent), so neither side profits from math-verify's parse caches
across items. Pool start-up time is reported separately and not counted.

Usage: python -m benchmarks.reward_throughput [--n 1500] [--workers 2] [--seed 0] [--rounds 6]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time


def typical_items(n: int, seed: int = 0) -> list[tuple[str, str, bool]]:
    """(gold, response, equivalent) triples of the shapes seen on MATH/GSM8K-style tasks."""
    rng = random.Random(seed)
    out: list[tuple[str, str, bool]] = []
    seen: set[tuple[str, str]] = set()
    while len(out) < n:
        # mix roughly like MATH-500 answers: mostly integers and fractions, some structured answers
        kind = rng.choices(range(8), weights=(20, 35, 10, 7, 7, 5, 10, 6))[0]
        same = rng.random() < 0.5
        a, b = rng.randint(1, 997), rng.randint(2, 997)
        if kind == 0:  # fraction vs decimal or fraction
            gold = f"\\frac{{{a}}}{{{b}}}"
            pred = f"\\frac{{{2 * a}}}{{{2 * b}}}" if same else f"\\frac{{{a + 1}}}{{{b}}}"
        elif kind == 1:  # integer with thousands separator / latex text
            v = a * 1000 + b
            gold = str(v)
            w = v if same else v + 1
            pred = f"{w:,}" if rng.random() < 0.5 else str(w)
        elif kind == 2:  # roots
            gold = f"{a}\\sqrt{{{b}}}"
            pred = f"\\sqrt{{{a * a * b}}}" if same else f"{a}\\sqrt{{{b + 1}}}"
        elif kind == 3:  # intervals
            gold = f"[{a}, {a + b})"
            pred = f"[{a},{a + b})" if same else f"({a},{a + b}]"
        elif kind == 4:  # tuples
            gold = f"({a}, {b})"
            pred = f"\\left({a},{b}\\right)" if same else f"({b}, {a})"
        elif kind == 5:  # polynomial identity
            gold = f"x^2+{a + b}x+{a * b}"
            pred = f"(x+{a})(x+{b})" if same else f"(x+{a})(x+{b + 1})"
        elif kind == 6:  # decimals vs fractions
            gold = f"{a}.5"
            pred = f"\\frac{{{2 * a + 1}}}{{2}}" if same else f"{a}.25"
        else:  # sets
            gold = f"\\{{{a}, {b}\\}}"
            pred = f"\\{{{b},{a}\\}}" if same else f"\\{{{a},{b + 1}\\}}"
        wrap = rng.randrange(3)
        response = (f"Step by step ... so the result is \\boxed{{{pred}}}." if wrap == 0 else
                    f"We compute it.\nThe final answer is ${pred}$." if wrap == 1 else
                    f"... therefore $\\boxed{{{pred}}}$")
        if (gold, response) in seen:
            continue
        seen.add((gold, response))
        out.append((gold, response, same))
    return out


def _cpu_seconds(pids=()) -> float:
    """CPU time (user + system) of this process plus the given worker processes."""
    import psutil

    total = time.process_time()
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a worker replaced mid-run: its time is lost (rare; timeouts only)
            pass
    return total


def _sequential_math_verify(items) -> tuple[float, int]:
    from math_verify import parse, verify

    from megatron_amir.rewards.extract import extract_answer
    from megatron_amir.rewards.math_worker import wrap

    t = time.perf_counter()
    correct = 0
    for gold, response, _ in items:
        ans = extract_answer(response) or ""
        g = parse(wrap(gold), parsing_timeout=5)
        p = parse(wrap(ans), parsing_timeout=5)
        correct += bool(verify(g, p, timeout_seconds=5))
    return time.perf_counter() - t, correct


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=6, help="alternating baseline/pool rounds")
    args = ap.parse_args(argv)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)

    from megatron_amir.rewards import ExactReward, get_reward_fn

    items = typical_items(args.n, args.seed)
    warm = typical_items(64, args.seed + 1000)
    n_equiv = sum(s for *_, s in items)
    rows: list[tuple[str, int, float, str]] = []

    # baseline (single process, sequential) and pool (every item a math-verify call), interleaved in
    # rounds with alternating order so both see the same background load on a shared machine
    _sequential_math_verify(warm)  # warms the parser in this process
    pool_fn = get_reward_fn("math", num_workers=args.workers, timeout_s=5.0, fast_path=False, cache_size=0)
    t = time.perf_counter()
    pool_fn([r for _, r, _ in warm], [g for g, _, _ in warm])  # starts and warms the workers
    startup_s = time.perf_counter() - t
    seq_s = seq_cpu = pool_s = pool_cpu = busy_seq = busy_pool = 0.0
    seq_correct = pool_correct = timeouts = errors = 0
    rounds = max(1, args.rounds)
    # the parallelism this machine offers right now: the same pure-CPU busy loop sequentially vs in the
    # pool, measured inside the same rounds (the ceiling for the ratio under the current load)
    busy = [(range(3_000_000),)] * (2 * args.workers)
    for r in range(rounds):
        part = items[r::rounds]
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            if which == 0:
                c0 = _cpu_seconds()
                dt, ok = _sequential_math_verify(part)
                seq_cpu += _cpu_seconds() - c0
                seq_s += dt
                seq_correct += ok
                t = time.perf_counter()
                for w in busy:
                    sum(*w)
                busy_seq += time.perf_counter() - t
            else:
                pids = pool_fn.pool.pids()
                c0, t = _cpu_seconds(pids), time.perf_counter()
                res = pool_fn([x[1] for x in part], [x[0] for x in part])
                pool_s += time.perf_counter() - t
                pool_cpu += _cpu_seconds(pids) - c0
                pool_correct += sum(res.correct)
                timeouts, errors = timeouts + res.timeouts, errors + res.errors
                t = time.perf_counter()
                pool_fn.pool.map("builtins:sum", busy)
                busy_pool += time.perf_counter() - t
    headroom = busy_seq / busy_pool
    pool_fn.close()
    rows.append(("math-verify sequential (1 process)", len(items), seq_s, seq_cpu,
                 f"{seq_correct}/{n_equiv} equiv"))
    rows.append((f"MathReward pool, {args.workers} workers, no fast path", len(items), pool_s, pool_cpu,
                 f"{pool_correct}/{n_equiv} equiv, {timeouts} timeouts, {errors} errors"))

    # default MathReward on GRPO-shaped batches: 8 samples per problem, typical repeats
    rng = random.Random(args.seed)
    g_batch, r_batch = [], []
    for gold, response, _ in items[: len(items) // 8]:
        wrong = f"The answer is {rng.randint(0, 99)}."
        for _ in range(8):
            g_batch.append(gold)
            r_batch.append(rng.choice([response, response, wrong, f"#### {gold}", "I am not sure."]))
    default_fn = get_reward_fn("math", num_workers=args.workers, timeout_s=5.0)
    default_fn([r for _, r, _ in warm], [g for g, _, _ in warm])
    pids = default_fn.pool.pids()
    c0, t = _cpu_seconds(pids), time.perf_counter()
    res = default_fn(r_batch, g_batch)
    dflt_s = time.perf_counter() - t
    dflt_cpu = _cpu_seconds(pids) - c0
    st = default_fn.stats
    rows.append(("MathReward default (fast path + cache), G=8 batches", len(r_batch), dflt_s, dflt_cpu,
                 f"{st['fast_path']} fast, {st['cache_hits']} cached, {st['pool_calls']} pool calls"))
    default_fn.close()

    # exact reward on the synthetic task
    from megatron_amir.data.synthetic import make_splits

    probs, _ = make_splits(kinds=["add", "sub", "mul", "linear", "word"], num_train=4000, num_test=10, seed=1)
    ex_resp = [p.solution if i % 2 else p.solution[:-1] + "9" for i, p in enumerate(probs)]
    c0, t = _cpu_seconds(), time.perf_counter()
    res = ExactReward()(ex_resp, [p.answer for p in probs])
    ex_s = time.perf_counter() - t
    rows.append(("ExactReward (synthetic task)", len(probs), ex_s, _cpu_seconds() - c0,
                 f"{sum(res.correct)} correct"))

    print(f"reward throughput (cpus={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}, "
          f"pool start-up {startup_s:.2f}s not counted; a pure-CPU busy loop runs {headroom:.2f}x faster "
          f"in the {args.workers}-worker pool than in one process right now = the ceiling for the ratio)")
    print(f"{'verifier':56s} {'items':>6s} {'wall s':>8s} {'verif/s':>9s} {'cpu s':>7s} {'verif/cpu-s':>11s}  notes")
    for name, n, s, cpu, note in rows:
        print(f"{name:56s} {n:6d} {s:8.3f} {n / s:9.1f} {cpu:7.2f} {n / max(cpu, 1e-9):11.1f}  {note}")
    ratio = (len(items) / pool_s) / (len(items) / seq_s)
    print(f"reward_throughput: ratio={ratio:.2f} (goal >= 1.5)")


if __name__ == "__main__":
    main()
