"""The synthetic task as natural-language questions, for pretrained chat models.

The synthetic prompts (``47+85=``) suit a model trained from scratch on them; an instruct model is asked the
same problem as a person would be, then given an answer format that the ``math`` reward extracts
(``megatron_amir.rewards.extract``: boxed, ``####`` or "The answer is"):

- ``add``    ``47+85=``        -> ``What is 47 + 85?``
- ``sub``    ``82-35=``        -> ``What is 82 - 35?``
- ``mul``    ``47*36=``        -> ``What is 47 times 36?``
- ``linear`` ``3x+7=22 x=``    -> ``Solve 3x+7=22 for x.``
- ``word``   already a sentence, kept as is.

Each question is followed by ``instruction`` (default: end with "The answer is N."). The records keep the
synthetic problem's id, answer, kind and difficulty, so splits stay disjoint and results can be broken down by
kind. They are ``PromptRecord``s with a plain prompt: ``data.template: chat`` wraps them in the tokenizer's chat
template when the trainer loads them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from megatron_amir.data.dataset import PromptRecord
from megatron_amir.data.synthetic import Problem
from megatron_amir.fileio import atomic_write_text

__all__ = ["ANSWER_INSTRUCTION", "natural_question", "natural_records", "write_records"]

ANSWER_INSTRUCTION = "End your reply with 'The answer is N.' where N is the number."

_BINARY = re.compile(r"(\d+)([-+*])(\d+)=")
_OPS = {"+": "+", "-": "-", "*": "times"}


def natural_question(problem: Problem) -> str:
    """The problem's question in words (no answer instruction)."""
    if problem.kind in ("add", "sub", "mul"):
        m = _BINARY.fullmatch(problem.prompt)
        if m is None:
            raise ValueError(f"synthetic {problem.kind} prompt {problem.prompt!r} is not 'a{{op}}b='")
        a, op, b = m.groups()
        return f"What is {a} {_OPS[op]} {b}?"
    if problem.kind == "linear":
        if not problem.prompt.endswith(" x="):
            raise ValueError(f"synthetic linear prompt {problem.prompt!r} does not end in ' x='")
        return f"Solve {problem.prompt[:-3]} for x."
    if problem.kind == "word":
        return problem.prompt
    raise ValueError(f"no natural-language form for synthetic kind {problem.kind!r}")


def natural_records(problems: Sequence[Problem], instruction: str = ANSWER_INSTRUCTION) -> list[PromptRecord]:
    """PromptRecords (prompt = question + instruction) with the synthetic id, answer, kind and difficulty."""
    out = []
    for p in problems:
        text = natural_question(p) + (f" {instruction}" if instruction else "")
        out.append(PromptRecord(id=p.id, prompt=text, answer=p.answer,
                                metadata={"kind": p.kind, "difficulty": p.difficulty}))
    return out


def write_records(records: Sequence[PromptRecord], path: str | Path) -> Path:
    """Write records as JSONL (``data.source: jsonl`` reads it back), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return path
