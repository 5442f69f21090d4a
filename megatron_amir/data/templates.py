"""Prompt templates: how a problem's text (or chat messages) becomes the prompt string the model sees.

Built-in names (``data.template``):

- ``plain``: the text as is (the synthetic task's prompts are already complete, e.g. ``47+85=``)
- ``chat``: one user message through the tokenizer's chat template
- ``boxed``: the text + "Please reason step by step, and put your final answer within \\boxed{}."
- ``chat-boxed``: ``boxed`` inside the chat template (the usual setup for instruct models on MATH)
- ``gsm8k``: ``Question: ...\\nAnswer:`` (completion ends in ``#### N``)

Any other string containing ``{prompt}`` is used as a format string (``"Q: {prompt}\\nA:"``).
Records that carry chat ``messages`` always go through the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

__all__ = ["Template", "get_template", "apply_template", "prepare_prompts", "TEMPLATES", "BOXED_INSTRUCTION"]

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Template:
    """fmt: a format string with ``{prompt}``; chat: wrap the result as a user message in the chat template."""

    name: str
    fmt: str = "{prompt}"
    chat: bool = False
    system: Optional[str] = None

    def render(self, text: str, tokenizer: Any = None) -> str:
        body = self.fmt.replace("{prompt}", text)  # replace, not str.format: math text is full of braces
        if not self.chat:
            return body
        if tokenizer is None:
            raise ValueError(f"template {self.name!r} needs a tokenizer (chat template)")
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
                   [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages)

    def render_messages(self, messages: list[dict[str, str]], tokenizer: Any) -> str:
        if tokenizer is None:
            raise ValueError("chat messages need a tokenizer (chat template)")
        return tokenizer.apply_chat_template(messages)

    def __call__(self, text: str, tokenizer: Any = None) -> str:
        return self.render(text, tokenizer)


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain"),
    "chat": Template("chat", chat=True),
    "boxed": Template("boxed", "{prompt}\n" + BOXED_INSTRUCTION),
    "chat-boxed": Template("chat-boxed", "{prompt}\n" + BOXED_INSTRUCTION, chat=True),
    "gsm8k": Template("gsm8k", "Question: {prompt}\nAnswer:"),
}


def get_template(name: str) -> Template:
    if name in TEMPLATES:
        return TEMPLATES[name]
    if "{prompt}" in name:
        return Template("custom", name)
    raise ValueError(f"unknown prompt template {name!r}: use one of {sorted(TEMPLATES)} "
                     "or a format string containing {{prompt}}")


def apply_template(records: Sequence[Any], template: str | Template, tokenizer: Any = None) -> list[Any]:
    """Records with ``prompt`` replaced by the rendered text (chat ``messages`` rendered by the chat
    template; the raw text is kept in ``metadata['raw_prompt']`` for PromptRecords)."""
    tmpl = get_template(template) if isinstance(template, str) else template
    out = []
    for r in records:
        messages = getattr(r, "messages", None)
        if messages:
            text = tmpl.render_messages(messages, tokenizer)
        else:
            text = tmpl.render(r.prompt, tokenizer)
        meta = getattr(r, "metadata", None)
        if isinstance(meta, dict):
            r = replace(r, prompt=text, metadata={**meta, "raw_prompt": r.prompt})
        else:
            r = replace(r, prompt=text)
        out.append(r)
    return out


def prepare_prompts(records: Sequence[Any], tokenizer: Any, template: str | Template = "plain",
                    max_prompt_tokens: Optional[int] = None):
    """Template + length filter in one call (what a trainer does with ``DataConfig.template`` and
    ``DataConfig.max_prompt_tokens``): returns ``(records with rendered prompts, LengthReport | None)``."""
    from .dataset import filter_by_length

    out = apply_template(records, template, tokenizer)
    if max_prompt_tokens is None:
        return out, None
    return filter_by_length(out, tokenizer, max_prompt_tokens)
