"""Benchmark evaluation: n samples per problem from a rollout engine, verified, scored, written per problem.

``evaluate`` is the library entry point (any ``megatron_amir.rollout.Engine``, any tokenizer with
``encode``/``decode``, any reward function); ``main`` is ``megatron-amir eval``, which builds those
from a checkpoint directory and a benchmark name or file (see ``megatron_amir.eval.loading``).

Each problem's samples are drawn with the per-request seed ``seed + problem index``, so results do
not depend on the batch size or on which other problems share a batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megatron_amir.eval.results import (
    RESULTS_FILE,
    SUMMARY_FILE,
    EvalSummary,
    ProblemResult,
    atomic_write_text,
    summarize,
)
from megatron_amir.rollout.engine import close_engine

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- adapters
@dataclass
class EvalProblem:
    """What evaluation needs of a problem: an id, the prompt text, the gold answer."""

    id: str
    prompt: str
    answer: str


def as_eval_problem(p: Any, index: int) -> EvalProblem:
    """Accept a dict or any object with id/prompt/answer (``megatron_amir.data`` Problem included).

    A missing id falls back to the position; ``question``/``problem`` and ``gold``/``solution`` are
    accepted as aliases, since benchmark files name them differently."""
    get = (lambda k: p.get(k)) if isinstance(p, dict) else (lambda k: getattr(p, k, None))
    prompt = next((get(k) for k in ("prompt", "question", "problem") if get(k) is not None), None)
    answer = next((get(k) for k in ("answer", "gold") if get(k) is not None), None)
    if prompt is None:
        raise ValueError(f"problem #{index}: no 'prompt' (or 'question'/'problem') field")
    if answer is None:
        raise ValueError(f"problem #{index}: no 'answer' (or 'gold') field")
    pid = get("id")
    return EvalProblem(id=str(pid) if pid is not None else str(index), prompt=str(prompt), answer=str(answer))


@dataclass
class Verdict:
    """A verifier's judgement of one sample."""

    correct: bool
    reward: float
    answer: Optional[str]


def _extract_answer_fallback(text: str) -> Optional[str]:
    """Last ``\\boxed{...}`` content, else the text after the last ``####``; None when neither exists.

    Only used for maj@k voting when the reward function reports no extracted answer."""
    i = text.rfind("\\boxed{")
    if i >= 0:
        depth, j = 0, i + len("\\boxed{")
        for k in range(j, len(text)):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                if depth == 0:
                    return text[j:k].strip() or None
                depth -= 1
    i = text.rfind("####")
    if i >= 0:
        rest = text[i + 4:].strip().split()
        return rest[0] if rest else None
    return None


def make_verdict(out: Any, text: str, correct_threshold: float) -> Verdict:
    """Normalize what a reward function returns: a number, a bool, or an object/dict with
    ``reward`` and optionally ``correct`` and ``pred``/``answer`` (the extracted answer)."""
    if isinstance(out, bool):
        return Verdict(out, float(out), _extract_answer_fallback(text))
    if isinstance(out, (int, float)):
        r = float(out)
        return Verdict(r >= correct_threshold, r, _extract_answer_fallback(text))
    get = (lambda k: out.get(k)) if isinstance(out, dict) else (lambda k: getattr(out, k, None))
    reward = get("reward")
    if reward is None and get("correct") is None:
        raise TypeError(f"reward function returned {type(out).__name__} without 'reward' or 'correct'")
    correct = get("correct")
    r = float(reward) if reward is not None else float(bool(correct))
    ok = bool(correct) if correct is not None else r >= correct_threshold
    pred = next((get(k) for k in ("pred", "answer", "extracted") if get(k) is not None), None)
    return Verdict(ok, r, str(pred) if pred is not None else _extract_answer_fallback(text))


def _normalize(ans: Optional[str]) -> Optional[str]:
    """The rewards module's answer normalization (so "1,000" and "1000" vote together), if available."""
    if ans is None:
        return None
    try:
        from megatron_amir.rewards import normalize_answer
    except ImportError:  # the rewards package is optional for library use of evaluate
        return ans.strip() or None
    return normalize_answer(ans) or None


def _is_batch_reward(reward_fn: Callable) -> bool:
    if getattr(reward_fn, "batch", False):
        return True
    try:
        from megatron_amir.rewards import RewardFn
    except ImportError:
        return False
    return isinstance(reward_fn, RewardFn)


def score_samples(reward_fn: Callable, texts: list[str], golds: list[str], correct_threshold: float) -> list[Verdict]:
    """Verify samples against their gold answers (one call for a whole batch of problems).

    A ``megatron_amir.rewards.RewardFn`` (or any callable with ``batch = True``) is called once as
    ``reward_fn(texts, golds)`` and may return a ``RewardResult`` (rewards, correct, extracted)
    or a list; any other callable is called per sample as ``reward_fn(text, gold)``."""
    if len(texts) != len(golds):
        raise ValueError(f"score_samples: {len(texts)} texts but {len(golds)} gold answers")
    if _is_batch_reward(reward_fn):
        out = reward_fn(texts, golds)
        if hasattr(out, "rewards") and hasattr(out, "correct"):
            extracted = list(getattr(out, "extracted", None) or [None] * len(texts))
            if not (len(out.rewards) == len(out.correct) == len(extracted) == len(texts)):
                raise ValueError(f"reward function returned {len(out.rewards)} rewards / {len(out.correct)} "
                                 f"correct flags / {len(extracted)} answers for {len(texts)} samples")
            return [Verdict(bool(c), float(r), _normalize(e) if e is not None else _normalize(_extract_answer_fallback(t)))
                    for r, c, e, t in zip(out.rewards, out.correct, extracted, texts)]
        outs = list(out)
        if len(outs) != len(texts):
            raise ValueError(f"reward function returned {len(outs)} results for {len(texts)} samples")
    else:
        outs = [reward_fn(t, g) for t, g in zip(texts, golds)]
    verdicts = [make_verdict(o, t, correct_threshold) for o, t in zip(outs, texts)]
    for v in verdicts:
        v.answer = _normalize(v.answer)
    return verdicts


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return list(ids.ids if hasattr(ids, "ids") else ids)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Response text without special tokens (megatron_amir.data Tokenizer or a transformers tokenizer)."""
    ids = [int(i) for i in ids]
    for kw in ("skip_special_tokens", "skip_special"):  # transformers swallows unknown kwargs: its name first
        try:
            return tokenizer.decode(ids, **{kw: True})
        except TypeError:
            continue
    return tokenizer.decode(ids)


# --------------------------------------------------------------------------------------------- evaluate
def evaluate(
    engine: Any,
    tokenizer: Any,
    problems: Sequence[Any],
    reward_fn: Callable,
    samples: int,
    sampling_params: Any = None,
    out_path: str | os.PathLike | None = None,
    *,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 0,
    ks: Optional[list[int]] = None,
    correct_threshold: float = 0.5,
    progress: bool = True,
    keep_texts: bool = True,
    format_prompt: Optional[Callable[[str], str]] = None,
    meta: Optional[dict[str, Any]] = None,
) -> EvalSummary:
    """Sample ``samples`` completions for every problem, verify them and write the results.

    engine: a ``megatron_amir.rollout.Engine`` (``generate(prompt_ids, params, n) -> [GroupResult]``).
    sampling_params: a ``megatron_amir.rollout.SamplingParams``; None builds one from the keyword
      arguments (temperature 1.0, max_new_tokens 128, stop at ``tokenizer.eos_id`` by default); keyword
      arguments given alongside sampling_params override its fields. Its ``seed`` is replaced per
      problem by ``seed + index``.
    reward_fn: a ``megatron_amir.rewards.RewardFn`` (batch, returns RewardResult) or any
      ``reward_fn(text, gold) -> float | bool | object with reward/correct/pred``.
      A sample is correct when the verdict says so, else when reward >= correct_threshold.
    format_prompt: maps a problem's prompt text to the text the model sees (a chat template);
      identity when None. results.jsonl stores the problem's own prompt.
    out_path: a directory (gets ``results.jsonl`` and ``summary.json``) or a ``*.jsonl`` file path
      (the summary goes next to it as ``<stem>.summary.json``). The results grow in ``<file>.partial``
      as problems finish and are renamed into place at the end; the summary is written atomically.
    """
    if out_path is None:
        raise ValueError("evaluate: out_path is required (a directory or a .jsonl file)")
    sampling_params = _sampling_params(sampling_params, tokenizer, temperature=temperature, top_p=top_p, top_k=top_k,
                                       max_new_tokens=max_new_tokens)
    if samples < 1:
        raise ValueError(f"samples={samples}: need at least 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need at least 1")
    probs = [as_eval_problem(p, i) for i, p in enumerate(problems)]
    if not probs:
        raise ValueError("evaluate: no problems")
    seen: set[str] = set()
    for p in probs:
        if p.id in seen:
            raise ValueError(f"duplicate problem id {p.id!r}")
        seen.add(p.id)

    results_file, summary_file = output_paths(out_path)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    partial = results_file.with_name(results_file.name + ".partial")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(probs), desc="eval", unit="problem", dynamic_ncols=True)
    t0 = time.time()
    results: list[ProblemResult] = []
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for start in range(0, len(probs), batch_size):
                chunk = probs[start:start + batch_size]
                prompt_ids = [_encode(tokenizer, format_prompt(p.prompt) if format_prompt else p.prompt)
                              for p in chunk]
                params = [_with_seed(sampling_params, seed + start + j) for j in range(len(chunk))]
                groups = engine.generate(prompt_ids, params, n=samples)
                if len(groups) != len(chunk):
                    raise RuntimeError(f"engine returned {len(groups)} groups for {len(chunk)} prompts")
                for p, g in zip(chunk, groups):
                    if len(g.samples) != samples:
                        raise RuntimeError(f"engine returned {len(g.samples)} samples for problem {p.id!r}, "
                                           f"asked for {samples}")
                texts = [[_decode(tokenizer, smp.token_ids) for smp in g.samples] for g in groups]
                # one verifier call per batch: a worker-pool verifier (math) then runs the batch in parallel
                flat = score_samples(reward_fn, [t for ts in texts for t in ts],
                                     [p.answer for p in chunk for _ in range(samples)], correct_threshold)
                for j, (p, g) in enumerate(zip(chunk, groups)):
                    verdicts = flat[j * samples:(j + 1) * samples]
                    rec = ProblemResult(
                        id=p.id, prompt=p.prompt, gold=p.answer,
                        texts=texts[j] if keep_texts else [""] * samples,
                        correct=[v.correct for v in verdicts],
                        lengths=[len(smp.token_ids) for smp in g.samples],
                        answers=[v.answer for v in verdicts],
                        rewards=[v.reward for v in verdicts],
                        mean_logprobs=[_mean_logprob(smp.logprobs) for smp in g.samples],
                    )
                    results.append(rec)
                    f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
                f.flush()
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix(acc=f"{sum(r.num_correct for r in results) / max(1, sum(r.n for r in results)):.3f}")
        os.replace(partial, results_file)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(results, ks)
    summary.extra.update({"elapsed_s": round(time.time() - t0, 3), "seed": seed,
                          "sampling_params": _params_dict(sampling_params), **(meta or {})})
    atomic_write_text(summary_file, json.dumps(summary.to_json(), indent=2) + "\n")
    return summary


def output_paths(out_path: str | os.PathLike) -> tuple[Path, Path]:
    """(results file, summary file) for a run directory or a ``*.jsonl`` results path."""
    p = Path(out_path)
    if p.suffix == ".jsonl":
        return p, p.with_name(p.stem + ".summary.json")
    return p / RESULTS_FILE, p / SUMMARY_FILE


def _sampling_params(params: Any, tokenizer: Any, **fields: Any) -> Any:
    """The SamplingParams to use: the given one with non-None ``fields`` applied, or a new one."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if params is not None:
        return params.replace(**fields) if fields else params
    from megatron_amir.rollout.engine import SamplingParams

    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return SamplingParams(stop_token_ids=() if eos is None else (int(eos),), **fields)


def _mean_logprob(lps: Sequence[float]) -> Optional[float]:
    """Length-normalized log-prob of a sample (None for an empty sample or a non-finite value)."""
    if not lps:
        return None
    m = float(sum(lps)) / len(lps)
    return m if math.isfinite(m) else None


def _with_seed(params: Any, seed: int) -> Any:
    return params.replace(seed=seed) if hasattr(params, "replace") else params


def _params_dict(params: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(params):
        d = dataclasses.asdict(params)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    return {"repr": repr(params)}


def format_summary(s: EvalSummary) -> str:
    lines = [f"problems: {s.num_problems}  samples/problem: {s.samples}  "
             f"sample accuracy: {s.num_correct_samples / max(1, s.num_samples):.4f}"]
    lines.append("  ".join(f"pass@{k}={v:.4f}" for k, v in s.pass_at_k.items()))
    lines.append("  ".join(f"maj@{k}={v:.4f}" for k, v in s.maj_at_k.items()))
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
    lines.append(f"mean response length: correct {fmt(s.mean_length_correct)}  "
                 f"incorrect {fmt(s.mean_length_incorrect)} tokens")
    if s.median_logprob_margin is not None:
        lines.append(f"median log-prob margin (correct - incorrect): {s.median_logprob_margin:.4f} "
                     f"over {s.extra.get('problems_with_margin')} problems")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-amir eval",
                                description="Sample k completions per benchmark problem, verify, report pass@k")
    p.add_argument("--model", required=True, help="Megatron-amir checkpoint directory or Hugging Face model directory")
    p.add_argument("--bench", required=True, help="benchmark name (e.g. math500, synthetic) or a JSONL/parquet file")
    p.add_argument("--samples", type=int, default=8, help="samples per problem (n); pass@k for k=1,2,4,..<=n")
    p.add_argument("--out", required=True, help="output directory (results.jsonl, summary.json) or a .jsonl path")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run at --out")
    p.add_argument("--config", default=None, help="YAML config; its rollout/data/reward/eval sections give defaults")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: from the model or config)")
    p.add_argument("--temperature", type=float, default=None, help="default: eval.temperature of the config")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-problems", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per engine call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logprobs-mode", choices=["processed_logprobs", "raw_logprobs"], default="raw_logprobs",
                   help="log-probs recorded per sample (raw = the model's own, as the paper's margin)")
    p.add_argument("--engine", choices=["embedded", "vllm", "remote"], default="embedded",
                   help="embedded torch engine (CPU or GPU), a colocated vLLM engine (GPU), or a running fleet of "
                        "rollout servers (remote: the model's weights are pushed to them first)")
    p.add_argument("--servers", nargs="+", default=None, help="remote: server URLs (default: rollout.servers)")
    p.add_argument("--discovery-file", default=None, help="remote: file listing server URLs, one per line")
    p.add_argument("--weights-dir", default=None,
                   help="remote: directory the servers read weights from (their --weights-root; default: "
                        "rollout.weight_sync_dir); bearer token from rollout.token or $MEGATRON_AMIR_TOKEN")
    p.add_argument("--device", default="auto", help="embedded engine device (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="embedded engine dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--no-texts", action="store_true", help="do not store sample texts in results.jsonl")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="config key.path=value overrides")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``megatron-amir eval``. Returns 0 on success, 2 on bad input (message on stderr)."""
    from megatron_amir.eval import loading

    args = build_parser().parse_intermixed_args(argv)  # overrides may sit between options
    if args.samples < 1:
        print("megatron-amir eval: --samples must be >= 1", file=sys.stderr)
        return 2
    existing = [p for p in output_paths(args.out) if p.exists()]
    if existing and not args.overwrite:  # checked before loading anything: a run's results are not lost silently
        print(f"megatron-amir eval: --out {args.out} already holds results ({', '.join(map(str, existing))}); "
              "pass --overwrite to replace them, or choose another --out", file=sys.stderr)
        return 2
    try:
        setup = loading.build_eval_setup(
            model=args.model, bench=args.bench, config_path=args.config, overrides=args.overrides,
            tokenizer_dir=args.tokenizer, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_new_tokens=args.max_new_tokens, max_problems=args.max_problems,
            logprobs_mode=args.logprobs_mode, seed=args.seed, engine=args.engine, device=args.device,
            dtype=args.dtype, remote={"servers": args.servers, "discovery_file": args.discovery_file,
                                      "weights_dir": args.weights_dir})
    except (loading.EvalSetupError, ValueError, FileNotFoundError) as exc:
        print(f"megatron-amir eval: {exc}", file=sys.stderr)
        return 2
    if setup.meta.get("logprobs_mode", args.logprobs_mode) != args.logprobs_mode:
        log.warning("--logprobs-mode %s does not apply to --engine remote: the servers report %s (recorded)",
                    args.logprobs_mode, setup.meta["logprobs_mode"])
    try:
        summary = evaluate(
            setup.engine, setup.tokenizer, setup.problems, setup.reward_fn, args.samples, setup.sampling_params,
            args.out, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
            keep_texts=not args.no_texts, format_prompt=setup.format_prompt,
            meta={"model": str(args.model), "bench": str(args.bench), "logprobs_mode": args.logprobs_mode,
                  **setup.meta})
    finally:
        close_engine(setup.engine)
    print(format_summary(summary))
    print("wrote " + " and ".join(str(p) for p in output_paths(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
