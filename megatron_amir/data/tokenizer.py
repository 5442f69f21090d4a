"""One small tokenizer interface over two back ends.

- ``SentencePieceTokenizer``: the tiny demo tokenizer, a sentencepiece BPE model trained in-process on the
  synthetic task corpus (``demo_tokenizer``), cached on disk under a hash of its inputs. Digits are split
  one per token (arithmetic needs it), no normalization and no dummy prefix, so ``decode(encode(s)) == s``
  for ASCII text and ``encode(prompt) + encode(completion) == encode(prompt + completion)`` for the
  synthetic task (prompts end in ``=``/``?``, completions start with a digit).
- ``HFTokenizer``: a Hugging Face tokenizer directory (a real model's). transformers-5 traps handled here:
  when ``tokenizer.json`` exists it is loaded with
  ``PreTrainedTokenizerFast`` so the pre-tokenizer in the file is used as written (``AutoTokenizer`` may
  rebuild a model family's default pre-tokenizer, which changes ids); otherwise ``AutoTokenizer``.

``load_tokenizer(dir)`` opens either kind from a directory written by ``Tokenizer.save``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from megatron_amir.fileio import atomic_write_bytes, publish_mode

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer", "demo_tokenizer",
           "DEMO_SPECIAL_TOKENS"]

_META_FILE = "megatron_amir_tokenizer.json"
_SPM_FILE = "tokenizer.model"
_FORMAT_VERSION = 2
# chat markers of the demo tokenizer; each is one token (user-defined symbol)
DEMO_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# always-single-token pieces of the demo vocabulary (the answer marker of the synthetic task)
_DEMO_SYMBOLS = ("####", "\n")  # newline cannot be learned from sentencepiece lines


class Tokenizer:
    """Interface used by the trainer, the rollout engine and the data pipeline.

    Attributes: ``eos_id``, ``pad_id`` (never None: falls back to eos), ``bos_id`` (None when the
    tokenizer has none), ``vocab_size`` (number of ids, i.e. max id + 1).
    """

    eos_id: int
    pad_id: int
    bos_id: Optional[int]
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``; with ``skip_special`` pad/eos/bos (and other control tokens) are dropped."""
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat (``[{"role": ..., "content": ...}, ...]``)."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer into ``directory`` (created if missing); each file appears atomically."""
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_batch(self, batch: Iterable[Sequence[int]], skip_special: bool = True) -> list[str]:
        return [self.decode(ids, skip_special=skip_special) for ids in batch]


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("chat messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"chat message {i} must be a dict with string 'role' and 'content', got {m!r}")


# ============================================================================================ sentencepiece
class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with pad=0, unk=1, bos=2, eos=3 and the demo chat markers."""

    def __init__(self, model_proto: bytes, meta: Optional[dict] = None):
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.meta = dict(meta or {})
        self.pad_id = self._sp.pad_id()
        self.eos_id = self._sp.eos_id()
        bos = self._sp.bos_id()
        self.bos_id = bos if bos >= 0 else None
        self.unk_id = self._sp.unk_id()
        self.vocab_size = self._sp.get_piece_size()
        if self.pad_id < 0:  # a model trained without a pad piece: pad with eos (masked anyway)
            self.pad_id = self.eos_id
        self._control = {i for i in (self.pad_id, self.eos_id, self.bos_id) if i is not None and i >= 0}
        self._chat_ids = {self._sp.piece_to_id(t) for t in DEMO_SPECIAL_TOKENS
                          if self._sp.piece_to_id(t) != self.unk_id}

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < 0 or (i >= self.vocab_size and not skip_special)]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if skip_special:
            # ids past the vocabulary are padding rows of a larger embedding (a model may sample them,
            # e.g. before training): like special tokens they decode to nothing
            ids = [i for i in ids if i < self.vocab_size and i not in self._control and i not in self._chat_ids]
            return self._sp.decode(ids)
        # sentencepiece drops control pieces when decoding; spell them out piece by piece instead
        out, run = [], []
        for i in ids:
            if i in self._control:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``<|role|>content<|end|>`` per message, then ``<|assistant|>`` for the reply."""
        _check_messages(messages)
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": "megatron_amir.sentencepiece", "version": _FORMAT_VERSION, **self.meta,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_id": self.bos_id, "vocab_size": self.vocab_size}
        atomic_write_bytes(d / _SPM_FILE, self._proto)
        atomic_write_bytes(d / _META_FILE, json.dumps(meta, indent=2).encode())

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "SentencePieceTokenizer":
        d = Path(directory)
        meta = json.loads((d / _META_FILE).read_text())
        if meta.get("format") != "megatron_amir.sentencepiece":
            raise ValueError(f"{d / _META_FILE}: not a megatron-amir sentencepiece tokenizer (format={meta.get('format')!r})")
        return cls((d / _SPM_FILE).read_bytes(), meta)


def _train_spm(texts: list[str], vocab_size: int, model_type: str) -> bytes:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a tiny corpus may not support vocab_size pieces: take what it has
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        byte_fallback=False,  # keeps the vocabulary small; the corpus includes every printable ASCII char
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=list(DEMO_SPECIAL_TOKENS) + list(_DEMO_SYMBOLS),
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def demo_tokenizer(cache_dir: str | os.PathLike, texts: Sequence[str], vocab_size: int = 256,
                   model_type: str = "bpe") -> SentencePieceTokenizer:
    """Train (or load from cache) the demo sentencepiece tokenizer on ``texts``.

    The cache entry is ``cache_dir/spm-<hash>`` where the hash covers the texts, vocab_size, model_type,
    this module's format version and the sentencepiece version; it is built in a temporary directory and
    renamed into place, so concurrent callers never see a half-written entry. Every printable ASCII
    character is added to the corpus, so any ASCII text encodes without ``<unk>``.
    """
    import sentencepiece as spm

    if vocab_size > 512:
        raise ValueError(f"demo_tokenizer: vocab_size={vocab_size} is meant to stay <= 512 for the tiny demo")
    if vocab_size < 128:
        raise ValueError(f"demo_tokenizer: vocab_size={vocab_size} must be >= 128 (printable ASCII + specials)")
    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("demo_tokenizer: no texts to train on")
    # every printable ASCII character, one per line: covered by the vocabulary, but no merges learned
    corpus.extend(c for c in string.printable if c not in "\x0b\x0c\r\n")
    h = hashlib.sha256()
    h.update(json.dumps({"v": _FORMAT_VERSION, "vocab": vocab_size, "type": model_type,
                         "spm": spm.__version__,
                         "symbols": list(DEMO_SPECIAL_TOKENS) + list(_DEMO_SYMBOLS)}).encode())
    for t in corpus:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    key = h.hexdigest()[:16]
    final = Path(cache_dir) / f"spm-{key}"
    if (final / _META_FILE).exists():
        return SentencePieceTokenizer.from_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    proto = _train_spm(corpus, vocab_size, model_type)
    tok = SentencePieceTokenizer(proto, {"cache_key": key, "requested_vocab_size": vocab_size,
                                         "model_type": model_type, "num_texts": len(corpus)})
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".spm-{key}."))
    publish_mode(tmp, directory=True)
    try:
        tok.save(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race and its entry is complete: use it
            if not (final / _META_FILE).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


# ============================================================================================ Hugging Face
class HFTokenizer(Tokenizer):
    """A transformers tokenizer behind the small interface."""

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise ValueError("HF tokenizer has no eos_token; set eos_token in tokenizer_config.json")
        self.eos_id = int(eos)
        pad = hf_tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        bos = hf_tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else None
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this HF tokenizer has no chat_template; use the plain template instead")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d, prefix=".tokenizer."))
        publish_mode(tmp, directory=True)
        try:
            self.hf.save_pretrained(str(tmp))
            for f in tmp.iterdir():  # each file lands atomically
                os.replace(f, d / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Open a tokenizer directory: a megatron-amir demo tokenizer or a Hugging Face tokenizer."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {d}")
    if (d / _META_FILE).exists():
        return SentencePieceTokenizer.from_dir(d)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (d / "tokenizer.json").exists():
        # the file's own pre-tokenizer/normalizer, not a family default (transformers-5 trap)
        return HFTokenizer(PreTrainedTokenizerFast.from_pretrained(str(d)))
    if not any((d / f).exists() for f in ("tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"{d}: no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model)")
    return HFTokenizer(AutoTokenizer.from_pretrained(str(d)))
