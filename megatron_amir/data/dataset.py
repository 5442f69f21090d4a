"""Prompt datasets: JSONL/Parquet loading with validation, a seeded resumable sampler, length filtering.

Record schema (one JSON object per line, or one Parquet row):

    id        str | int          required, unique within the file
    prompt    str (non-empty)    exactly one of prompt / messages
    messages  [{"role": str, "content": str}, ...]
    answer    str | int | float  required (numbers are written in canonical decimal: 27.0 -> "27")
    metadata  object             optional

Every validation error names ``file:line`` (Parquet: ``file:row N``) and the field. With
``on_bad_record="skip"`` bad records are dropped and counted (``PromptList.skipped`` and ``.problems``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["PromptRecord", "PromptList", "DatasetError", "load_prompts", "validate_record", "PromptSampler",
           "LengthReport", "filter_by_length", "canonical_answer"]


class DatasetError(ValueError):
    """A bad dataset record or file; the message starts with ``file:line``."""


@dataclass
class PromptRecord:
    """One prompt with its reference answer. ``prompt`` is the text the model sees (after a template);
    ``messages`` holds a chat instead (rendered into ``prompt`` by ``templates.apply_template``)."""

    id: str
    prompt: Optional[str]
    answer: str
    messages: Optional[list[dict[str, str]]] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"id": self.id, "answer": self.answer}
        if self.prompt is not None:
            d["prompt"] = self.prompt
        if self.messages is not None:
            d["messages"] = self.messages
        if self.metadata:
            d["metadata"] = self.metadata
        return d


class PromptList(list):
    """A list of PromptRecord plus what loading skipped: ``skipped`` (count) and ``problems``
    (the error message of each skipped record)."""

    def __init__(self, records=(), source: str = "", skipped: int = 0, problems: Optional[list[str]] = None):
        super().__init__(records)
        self.source, self.skipped, self.problems = source, skipped, list(problems or [])


def canonical_answer(value: Any) -> str:
    """Answers as text: numbers in canonical decimal (27.0 -> "27", 0.50 -> "0.5"), strings stripped."""
    if isinstance(value, bool):
        raise TypeError("bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError("non-finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    raise TypeError(type(value).__name__)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def validate_record(obj: Any, where: str) -> PromptRecord:
    """Check one decoded record against the schema; raise DatasetError naming ``where`` and the field."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    if "id" not in obj:
        raise DatasetError(f"{where}: missing field 'id'")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise DatasetError(f"{where}: field 'id' must be a string or integer, got {_type_name(rid)}")
    rid = str(rid)
    if not rid.strip():
        raise DatasetError(f"{where}: field 'id' is empty")
    has_p, has_m = "prompt" in obj, "messages" in obj
    if not has_p and not has_m:
        raise DatasetError(f"{where}: missing field 'prompt' (or 'messages')")
    if has_p and has_m:
        raise DatasetError(f"{where}: fields 'prompt' and 'messages' are exclusive; give one")
    prompt, messages = None, None
    if has_p:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise DatasetError(f"{where}: field 'prompt' must be a string, got {_type_name(prompt)}")
        if not prompt.strip():
            raise DatasetError(f"{where}: field 'prompt' is empty")
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{where}: field 'messages' must be a non-empty list, got {_type_name(messages)}")
        for j, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DatasetError(f"{where}: field 'messages[{j}]' must be an object, got {_type_name(m)}")
            for key in ("role", "content"):
                if not isinstance(m.get(key), str):
                    raise DatasetError(f"{where}: field 'messages[{j}].{key}' must be a string, "
                                       f"got {_type_name(m.get(key))}")
            if m["role"] not in ("system", "user", "assistant"):
                raise DatasetError(f"{where}: field 'messages[{j}].role' must be system/user/assistant, "
                                   f"got {m['role']!r}")
        if not any(m["content"].strip() for m in messages if m["role"] == "user"):
            raise DatasetError(f"{where}: field 'messages' has no non-empty user message")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if "answer" not in obj:
        raise DatasetError(f"{where}: missing field 'answer'")
    try:
        answer = canonical_answer(obj["answer"])
    except TypeError:
        raise DatasetError(f"{where}: field 'answer' must be a string or number, "
                           f"got {_type_name(obj['answer'])}") from None
    if not answer:
        raise DatasetError(f"{where}: field 'answer' is empty")
    meta = obj.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise DatasetError(f"{where}: field 'metadata' must be an object, got {_type_name(meta)}")
    return PromptRecord(id=rid, prompt=prompt, answer=answer, messages=messages, metadata=dict(meta))


def _iter_jsonl(path: Path):
    """(where, decoded object or DatasetError) per non-blank line; bytes are decoded per line so a
    non-UTF-8 line is reported by its number."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, DatasetError(f"{where}: not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, DatasetError(f"{where}: bad JSON: {exc.msg} (column {exc.colno})")


def read_utf8(path: Path) -> str:
    """The whole file as text; a non-UTF-8 byte is a DatasetError naming ``file:line``."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not valid UTF-8") from None


def _iter_json_array(path: Path):
    """A ``.json`` file holding one array of records: (``file:item N``, record)."""
    text = read_utf8(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: bad JSON: {exc.msg} (column {exc.colno})") from None
    for i, obj in enumerate(data, 1):
        yield f"{path}:item {i}", obj


def _is_json_array(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head[:1] == b"["


def _iter_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise DatasetError(f"{path}: reading Parquet needs pyarrow") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read Parquet: {exc}") from None
    for i, row in enumerate(table.to_pylist(), 1):
        # Parquet fills absent columns with null: drop nulls so "missing field" is reported as such
        yield f"{path}:row {i}", {k: v for k, v in row.items() if v is not None}


def load_prompts(path: str | Path, on_bad_record: str = "error") -> PromptList:
    """Load and validate a JSONL (``.jsonl``, or ``.json`` with one object per line), a JSON array
    (``.json`` starting with ``[``; records are named ``file:item N``) or Parquet (``.parquet``) file.

    on_bad_record: ``error`` raises DatasetError at the first bad record; ``skip`` drops bad records,
    counting them in ``PromptList.skipped`` with their messages in ``.problems``. Duplicate ids are bad
    records (the later one is reported, naming the line of the first).
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    if p.suffix == ".parquet":
        rows = _iter_parquet(p)
    elif _is_json_array(p):
        rows = _iter_json_array(p)
    else:
        rows = _iter_jsonl(p)
    out = PromptList(source=str(p))
    seen: dict[str, str] = {}
    for where, obj in rows:
        try:
            if isinstance(obj, DatasetError):
                raise obj
            rec = validate_record(obj, where)
            if rec.id in seen:
                raise DatasetError(f"{where}: field 'id': duplicate id {rec.id!r} (first at {seen[rec.id]})")
            seen[rec.id] = where
            out.append(rec)
        except DatasetError as exc:
            if on_bad_record == "error":
                raise
            out.skipped += 1
            out.problems.append(str(exc))
    if not out and out.skipped:
        raise DatasetError(f"{p}: every record was bad ({out.skipped} skipped); first: {out.problems[0]}")
    if not out:  # an empty (or whitespace-only) file is never a usable dataset; say which file
        raise DatasetError(f"{p}: no records (the file is empty)")
    return out


# ============================================================================================ sampler
def _fingerprint(records: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(str(getattr(r, "id", r)).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


class PromptSampler:
    """Deterministic epoch-wise shuffling with a resumable cursor.

    Epoch e visits every record once, in the order ``random.Random(f"{seed}:{e}").shuffle(range(n))``
    (``shuffle=False``: file order). ``next_batch(k)`` continues across epoch ends. ``state_dict()``
    saves (epoch, position) plus the dataset size and a fingerprint of the ids, so resuming on a
    different dataset is an error instead of a silent change of order.
    """

    def __init__(self, records: Sequence[Any], seed: int = 0, shuffle: bool = True):
        if len(records) == 0:
            raise ValueError("PromptSampler: no records")
        self.records = list(records)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.pos = 0, 0
        self._fp = _fingerprint(self.records)
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.records)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, k: int) -> list[Any]:
        if k < 0:
            raise ValueError(f"next_batch: k must be >= 0, got {k}")
        out = []
        for _ in range(k):
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._epoch_order(self.epoch)
            out.append(self.records[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.records), "fingerprint": self._fp}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "pos", "seed", "num_records", "fingerprint"):
            if key not in state:
                raise ValueError(f"PromptSampler state is missing {key!r}")
        if state["num_records"] != len(self.records) or state["fingerprint"] != self._fp:
            raise ValueError(
                f"PromptSampler state was saved for a different dataset ({state['num_records']} records, "
                f"fingerprint {state['fingerprint']}) than this one ({len(self.records)} records, {self._fp})")
        if not 0 <= int(state["pos"]) <= len(self.records):
            raise ValueError(f"PromptSampler state: pos={state['pos']} out of range")
        self.seed, self.shuffle = int(state["seed"]), bool(state.get("shuffle", True))
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)


# ============================================================================================ lengths
@dataclass
class LengthReport:
    """What ``filter_by_length`` kept and dropped (ids and token counts of the dropped prompts)."""

    kept: int
    dropped: int
    max_tokens: int
    dropped_ids: list[str] = field(default_factory=list)
    dropped_lengths: list[int] = field(default_factory=list)
    longest_kept: int = 0

    def summary(self) -> str:
        total = self.kept + self.dropped
        s = f"length filter (max {self.max_tokens} prompt tokens): kept {self.kept}/{total}, dropped {self.dropped}"
        if self.dropped:
            ex = ", ".join(f"{i} ({n})" for i, n in list(zip(self.dropped_ids, self.dropped_lengths))[:5])
            s += f"; e.g. {ex}"
        return s


def filter_by_length(records: Sequence[Any], tokenizer, max_prompt_tokens: int,
                     text_of=None) -> tuple[list[Any], LengthReport]:
    """Keep records whose prompt (``text_of(record)``, default ``record.prompt``) has at most
    ``max_prompt_tokens`` tokens; report the dropped ones."""
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    text_of = text_of or (lambda r: r.prompt)
    kept, rep = [], LengthReport(0, 0, max_prompt_tokens)
    for r in records:
        text = text_of(r)
        if text is None:
            raise ValueError(f"record {getattr(r, 'id', '?')}: no prompt text (apply a chat template first)")
        n = len(tokenizer.encode(text))
        if n <= max_prompt_tokens:
            kept.append(r)
            rep.longest_kept = max(rep.longest_kept, n)
        else:
            rep.dropped_ids.append(str(getattr(r, "id", "?")))
            rep.dropped_lengths.append(n)
    rep.kept, rep.dropped = len(kept), len(rep.dropped_ids)
    return kept, rep


def with_prompt(record: PromptRecord, prompt: str) -> PromptRecord:
    return replace(record, prompt=prompt)
