"""Loaders for the usual math benchmarks from local files in their common public formats.

No download happens here: point ``path`` at a file you have (``.jsonl``, ``.json`` (a list, or
``{"data"|"test"|"train": [...]}``) or ``.parquet``). Each loader maps the public field names onto
``PromptRecord(id, prompt, answer, metadata)``:

=================  ==========================================  ==============================================
benchmark          usual source / fields                       answer taken from
=================  ==========================================  ==============================================
math500            HuggingFaceH4/MATH-500: problem, solution,  ``answer``; else the last ``\\boxed{}`` of
                   answer, subject, level, unique_id           ``solution`` (original MATH files)
aime24 / aime25    HuggingFaceH4/aime_2024, math-ai/aime25,    ``answer`` (int or str)
                   opencompass AIME2025: id, problem|question
amc23              math-ai/amc23, AI-MO/aimo-validation-amc:   ``answer`` (floats like 27.0 -> "27")
                   id, question|problem, answer
gsm8k              openai/gsm8k: question, answer              the text after ``####`` (commas removed)
minerva            math-ai/minervamath: question, answer;      ``answer``; else last ``\\boxed{}`` of
                   original: problem, solution                 ``solution``
olympiadbench      Hothan/OlympiadBench: id, question,         ``final_answer`` (a list; joined with ", ",
                   final_answer, context, unit, ...            ``$`` stripped)
=================  ==========================================  ==============================================

A file whose fields match none of these (problem|question|prompt + answer|final_answer|gold) is read in the
``plain`` format, its ids labelled ``plain/...`` (``detect_benchmark``); ``NAME=FILE`` picks a format.

Errors name the file, the row and the missing field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

from ..rewards.extract import extract_boxed
from .dataset import DatasetError, PromptList, PromptRecord, canonical_answer, read_utf8

__all__ = ["BENCHMARKS", "PLAIN", "load_benchmark", "load_benchmark_file", "read_rows", "detect_benchmark"]


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """(where, row) for every record of a JSONL / JSON / Parquet file."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{p}:row {i}", r) for i, r in enumerate(pq.read_table(p).to_pylist(), 1)]
    text = read_utf8(p)
    stripped = text.lstrip()
    if p.suffix == ".json" and stripped[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if stripped[:1] == "[":
                raise DatasetError(f"{p}:{exc.lineno}: bad JSON: {exc.msg}") from None
            data = None  # a .json file holding JSON lines
        if isinstance(data, dict):
            for key in ("data", "test", "train", "problems"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if isinstance(data, list):
            return [(f"{p}:item {i}", r) for i, r in enumerate(data, 1)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{p}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{p}:{lineno}: bad JSON: {exc.msg} (column {exc.colno})") from None
    return rows


def _first(row: dict, keys: tuple[str, ...], where: str, what: str) -> Any:
    for k in keys:
        if k in row and row[k] is not None and row[k] != "":
            return row[k]
    raise DatasetError(f"{where}: missing field {what!r} (looked for {', '.join(keys)})")


def _answer_text(value: Any, where: str) -> str:
    try:
        ans = canonical_answer(value)
    except TypeError:
        raise DatasetError(f"{where}: field 'answer' must be a string or number, got {type(value).__name__}") from None
    if not ans:
        raise DatasetError(f"{where}: field 'answer' is empty")
    return ans


def _boxed_answer(row: dict, where: str) -> str:
    if row.get("answer") not in (None, ""):
        return _answer_text(row["answer"], where)
    sol = row.get("solution")
    if isinstance(sol, str):
        ans = extract_boxed(sol)
        if ans:
            return ans
    raise DatasetError(f"{where}: missing field 'answer' (and no \\boxed{{}} answer in 'solution')")


def _gsm8k_answer(row: dict, where: str) -> str:
    ans = _first(row, ("answer",), where, "answer")
    if not isinstance(ans, str):
        return _answer_text(ans, where)
    if "####" not in ans:
        raise DatasetError(f"{where}: field 'answer' has no '#### <number>' final answer")
    final = ans.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise DatasetError(f"{where}: field 'answer' is empty after '####'")
    return final


def _olympiad_answer(row: dict, where: str) -> str:
    fa = _first(row, ("final_answer", "answer"), where, "final_answer")
    if isinstance(fa, str):
        items = [fa]
    elif isinstance(fa, list) and fa and all(isinstance(x, (str, int, float)) for x in fa):
        items = [canonical_answer(x) for x in fa]
    else:
        raise DatasetError(f"{where}: field 'final_answer' must be a string or a non-empty list of strings")
    items = [re.sub(r"^\$+|\$+$", "", x.strip()).strip() for x in items]
    return ", ".join(i for i in items if i)


def _plain_answer(row: dict, where: str) -> str:
    return _answer_text(_first(row, ("answer", "final_answer", "gold"), where, "answer"), where)


PLAIN = "plain"  # the format of a file that matches no benchmark (ids plain/..., never a benchmark's label)

# name -> (prompt fields, answer function, metadata fields)
_SPECS: dict[str, tuple[tuple[str, ...], Callable[[dict, str], str], tuple[str, ...]]] = {
    "math500": (("problem", "question", "prompt"), _boxed_answer, ("subject", "level", "unique_id", "type")),
    "aime24": (("problem", "question", "prompt"), _plain_answer, ("year", "url")),
    "aime25": (("problem", "question", "prompt"), _plain_answer, ("year", "url")),
    "amc23": (("question", "problem", "prompt"), _plain_answer, ("url",)),
    "gsm8k": (("question", "prompt"), _gsm8k_answer, ()),
    "minerva": (("question", "problem", "prompt"), _boxed_answer, ("type", "subject")),
    "olympiadbench": (("question", "problem", "prompt"), _olympiad_answer,
                      ("subfield", "answer_type", "unit", "is_multiple_answer", "language", "modality")),
    # not a benchmark: any problem|question|prompt + answer file whose format is not recognised
    PLAIN: (("problem", "question", "prompt"), _plain_answer, ()),
}
BENCHMARKS = tuple(k for k in _SPECS if k != PLAIN)
_ALIASES = {"math-500": "math500", "math_500": "math500", "aime2024": "aime24", "aime_2024": "aime24",
            "aime2025": "aime25", "aime_2025": "aime25", "amc": "amc23", "amc2023": "amc23",
            "minerva_math": "minerva", "minervamath": "minerva", "olympiad": "olympiadbench",
            "olympiad_bench": "olympiadbench"}


def _canonical_name(name: str) -> str:
    key = name.lower().strip()
    key = _ALIASES.get(key, key)
    if key not in _SPECS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} "
                         f"(or {PLAIN}: problem + answer)")
    return key


def detect_benchmark(row: dict) -> str:
    """Guess the format of a row from its fields (used when no benchmark name is given)."""
    if "final_answer" in row:
        return "olympiadbench"
    if "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    if "problem" in row and ("solution" in row or "subject" in row or "level" in row):
        return "math500"
    return PLAIN  # problem|question|prompt + answer: no benchmark's own fields to tell which one


def load_benchmark_file(path: str | Path, name: Optional[str] = None, limit: Optional[int] = None) -> PromptList:
    """Records of one benchmark file; ``name`` picks the format (detected from the first row if None)."""
    rows = read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no records")
    bench = _canonical_name(name) if name else detect_benchmark(rows[0][1] if isinstance(rows[0][1], dict) else {})
    prompt_keys, answer_fn, meta_keys = _SPECS[bench]
    out = PromptList(source=str(path))
    seen: set[str] = set()
    stem = Path(path).stem
    for i, (where, row) in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
        prompt = _first(row, prompt_keys, where, "problem")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: field {prompt_keys[0]!r} must be a non-empty string")
        if bench == "olympiadbench" and isinstance(row.get("context"), str) and row["context"].strip():
            prompt = row["context"].strip() + "\n" + prompt
        answer = answer_fn(row, where)
        rid = row.get("id", row.get("unique_id", row.get("ID")))
        rid = f"{bench}/{rid}" if rid not in (None, "") else f"{bench}/{stem}/{i}"
        if rid in seen:
            raise DatasetError(f"{where}: field 'id': duplicate id {rid!r}")
        seen.add(rid)
        meta = {k: row[k] for k in meta_keys if k in row and row[k] is not None}
        meta["benchmark"] = bench
        out.append(PromptRecord(id=rid, prompt=prompt.strip(), answer=answer, metadata=meta))
    return out


def load_benchmark(name: str, source: Any = None, limit: Optional[int] = None) -> PromptList:
    """A named benchmark from a local file. ``source`` is the file path, or a ``DataConfig`` whose
    ``test_path`` (else ``train_path``) points at it."""
    bench = _canonical_name(name)
    path = source
    if source is not None and not isinstance(source, (str, Path)):
        path = getattr(source, "test_path", None) or getattr(source, "train_path", None)
    if not path:
        raise DatasetError(f"benchmark {bench}: no local file given (set data.test_path or data.train_path); "
                           "benchmarks are never downloaded at run time")
    return load_benchmark_file(path, bench, limit=limit)
