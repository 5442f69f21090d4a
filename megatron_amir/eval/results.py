"""The per-problem results file of an evaluation run (``results.jsonl``) and its summary numbers.

One JSON object per line, one line per problem, fields in parallel lists over the n samples:

    {"id": "math500/17", "prompt": "...", "gold": "3/4",
     "texts": [...], "answers": ["3/4", "0.7", null, ...], "correct": [true, false, false, ...],
     "lengths": [212, 180, 512, ...], "mean_logprobs": [-0.31, -0.52, ...] | null,
     "rewards": [1.0, 0.0, ...] | null}

``answers`` holds each sample's extracted final answer (null when none was found; used by maj@k),
``lengths`` the response length in tokens, ``mean_logprobs`` the sample's summed token log-prob
divided by its length (length-normalized, as the paper's implicit reward), or null when the engine
gave none. A run directory holds ``results.jsonl`` and ``summary.json``; both appear atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from megatron_amir.fileio import atomic_write_text  # noqa: F401  (re-exported: eval modules import it from here)

from megatron_amir.eval.passk import default_ks, maj_at_k, pass_at_k

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"


class ResultsError(ValueError):
    """A malformed or missing results file; the message names the file (and line)."""


@dataclass
class ProblemResult:
    id: str
    texts: list[str]
    correct: list[bool]
    lengths: list[int]
    answers: list[Optional[str]] = field(default_factory=list)
    mean_logprobs: Optional[list[Optional[float]]] = None
    rewards: Optional[list[float]] = None
    prompt: Optional[str] = None
    gold: Optional[str] = None

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def num_correct(self) -> int:
        return int(sum(bool(c) for c in self.correct))

    def __post_init__(self) -> None:
        if not self.answers:
            self.answers = [None] * len(self.correct)
        n = len(self.correct)
        for name in ("texts", "lengths", "answers", "mean_logprobs", "rewards"):
            val = getattr(self, name)
            if val is not None and len(val) != n:
                raise ValueError(f"problem {self.id!r}: '{name}' has {len(val)} entries but 'correct' has {n}")
        if n == 0:
            raise ValueError(f"problem {self.id!r}: no samples")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {"id": d.pop("id"), "prompt": d.pop("prompt"), "gold": d.pop("gold"), **d}

    @classmethod
    def from_json(cls, obj: Any) -> "ProblemResult":
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("id", "correct", "lengths") if k not in obj]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        correct = obj["correct"]
        if not isinstance(correct, list) or not all(isinstance(c, bool) for c in correct):
            raise ValueError("'correct' must be a list of booleans")
        lengths = obj["lengths"]
        if not isinstance(lengths, list) or not all(isinstance(x, int) and x >= 0 for x in lengths):
            raise ValueError("'lengths' must be a list of non-negative integers")
        mlp = obj.get("mean_logprobs")
        if mlp is not None and (not isinstance(mlp, list) or
                                not all(x is None or isinstance(x, (int, float)) for x in mlp)):
            raise ValueError("'mean_logprobs' must be null or a list of numbers/nulls")
        texts = obj.get("texts")
        if texts is None:
            texts = [""] * len(correct)
        return cls(id=str(obj["id"]), texts=list(texts), correct=list(correct), lengths=list(lengths),
                   answers=list(obj.get("answers") or []),
                   mean_logprobs=None if mlp is None else [None if x is None else float(x) for x in mlp],
                   rewards=obj.get("rewards"), prompt=obj.get("prompt"), gold=obj.get("gold"))


# --------------------------------------------------------------------------------------------- files
def write_results(path: str | os.PathLike, results: Iterable[ProblemResult]) -> None:
    atomic_write_text(path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in results))


def _step_of(path: Path) -> int:
    """The step number in a trainer eval file name such as ``eval_step000040.jsonl`` (-1 when none)."""
    m = re.search(r"step(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def resolve_results_path(run: str | os.PathLike) -> Path:
    """A run is a results JSONL file, or a directory holding ``results.jsonl``, ``eval/results.jsonl``,
    or the trainer's periodic ``eval/<tag>_stepNNNNNN.jsonl`` files (the highest step is taken)."""
    p = Path(run)
    if p.is_file():
        return p
    if p.is_dir():
        for cand in (p / RESULTS_FILE, p / "eval" / RESULTS_FILE):
            if cand.is_file():
                return cand
        periodic = sorted((f for f in (p / "eval").glob("*step*.jsonl") if _step_of(f) >= 0), key=_step_of) \
            if (p / "eval").is_dir() else []
        if periodic:
            return periodic[-1]
        raise ResultsError(f"run directory {p} holds no {RESULTS_FILE} (looked at {p / RESULTS_FILE}, "
                           f"{p / 'eval' / RESULTS_FILE} and {p / 'eval'}/*_stepN.jsonl)")
    raise ResultsError(f"run {p} does not exist (expected a directory with {RESULTS_FILE} or a .jsonl file)")


def read_results(run: str | os.PathLike) -> list[ProblemResult]:
    """Load a run's per-problem results; any bad line raises ResultsError naming file and line."""
    path = resolve_results_path(run)
    out: list[ProblemResult] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = ProblemResult.from_json(json.loads(line))
            except (json.JSONDecodeError, ValueError, TypeError) as exc:
                raise ResultsError(f"{path}:{lineno}: malformed results line: {exc}") from None
            if rec.id in seen:
                raise ResultsError(f"{path}:{lineno}: duplicate problem id {rec.id!r} (first on line {seen[rec.id]})")
            seen[rec.id] = lineno
            out.append(rec)
    if not out:
        raise ResultsError(f"{path}: no results (empty file)")
    return out


def summary_path_for(results_path: str | os.PathLike) -> Path:
    """The summary written beside a results file (``summary.json`` or ``<stem>.summary.json``)."""
    p = Path(results_path)
    return p.with_name(SUMMARY_FILE) if p.name == RESULTS_FILE else p.with_name(p.stem + ".summary.json")


SETTING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "logprobs_mode", "bench", "seed")


def eval_settings(results_path: str | os.PathLike) -> dict[str, Any]:
    """The sampling settings a results file was produced with (from its summary; {} when absent), so a
    comparison can show that its runs were evaluated alike."""
    sp = summary_path_for(results_path)
    try:
        extra = json.loads(sp.read_text()).get("extra", {})
    except (OSError, ValueError, AttributeError):
        return {}
    params = extra.get("sampling_params") or {}
    merged = {**params, **{k: v for k, v in extra.items() if k != "sampling_params"}}
    return {k: merged[k] for k in SETTING_KEYS if k in merged}


def settings_mismatch(settings: dict[str, dict[str, Any]], ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose value differs between runs that report them (``seed`` may differ on purpose: ignore it)."""
    keys = sorted({k for s in settings.values() for k in s} - set(ignore))
    return [k for k in keys if len({json.dumps(s.get(k)) for s in settings.values() if k in s}) > 1]


# --------------------------------------------------------------------------------------------- summary
@dataclass
class EvalSummary:
    num_problems: int
    samples: int  # the smallest per-problem sample count n; pass@k is reported for k <= samples
    pass_at_k: dict[int, float]
    maj_at_k: dict[int, float]
    mean_length_correct: Optional[float]
    mean_length_incorrect: Optional[float]
    num_samples: int
    num_correct_samples: int
    median_logprob_margin: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat scalar metrics for a metrics logger: pass@k, maj@k, sample accuracy, lengths, margin."""
        m: dict[str, float] = {f"pass@{k}": v for k, v in self.pass_at_k.items()}
        m.update({f"maj@{k}": v for k, v in self.maj_at_k.items()})
        m["sample_accuracy"] = self.num_correct_samples / max(1, self.num_samples)
        m["num_problems"] = float(self.num_problems)
        if self.mean_length_correct is not None:
            m["length_correct"] = self.mean_length_correct
        if self.mean_length_incorrect is not None:
            m["length_incorrect"] = self.mean_length_incorrect
        if self.median_logprob_margin is not None:
            m["logprob_margin_median"] = self.median_logprob_margin
        return m

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        d["maj_at_k"] = {str(k): v for k, v in self.maj_at_k.items()}
        return d


def logprob_margin(r: ProblemResult) -> Optional[float]:
    """Mean length-normalized log-prob of the correct samples minus that of the incorrect ones.

    None unless the problem has at least one correct and one incorrect sample with a log-prob
    (the paper's Figure 4 quantity, per problem)."""
    if r.mean_logprobs is None:
        return None
    good = [lp for lp, ok in zip(r.mean_logprobs, r.correct) if ok and lp is not None and math.isfinite(lp)]
    bad = [lp for lp, ok in zip(r.mean_logprobs, r.correct) if not ok and lp is not None and math.isfinite(lp)]
    if not good or not bad:
        return None
    return sum(good) / len(good) - sum(bad) / len(bad)


def summarize(results: list[ProblemResult], ks: Optional[list[int]] = None) -> EvalSummary:
    """pass@k and maj@k averaged over problems, pooled response lengths, median log-prob margin."""
    if not results:
        raise ValueError("summarize: no results")
    n_min = min(r.n for r in results)
    ks = ks or default_ks(n_min)
    bad = [k for k in ks if k > n_min]
    if bad:
        raise ValueError(f"k={bad} exceed the smallest per-problem sample count {n_min}")
    pk = {k: float(np.mean([pass_at_k(r.n, r.num_correct, k) for r in results])) for k in ks}
    mk = {k: float(np.mean([maj_at_k(r.answers, r.correct, k) for r in results])) for k in ks}
    len_ok = [ln for r in results for ln, ok in zip(r.lengths, r.correct) if ok]
    len_bad = [ln for r in results for ln, ok in zip(r.lengths, r.correct) if not ok]
    margins = [m for m in (logprob_margin(r) for r in results) if m is not None]
    return EvalSummary(
        num_problems=len(results), samples=n_min, pass_at_k=pk, maj_at_k=mk,
        mean_length_correct=float(np.mean(len_ok)) if len_ok else None,
        mean_length_incorrect=float(np.mean(len_bad)) if len_bad else None,
        num_samples=sum(r.n for r in results), num_correct_samples=sum(r.num_correct for r in results),
        median_logprob_margin=float(np.median(margins)) if margins else None,
        extra={"problems_with_margin": len(margins)},
    )
