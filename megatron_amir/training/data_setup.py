"""Build the trainer's data parts from the config: tokenizer, training-prompt sampler, held-out problems."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_amir.config import Config


def cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_AMIR_CACHE", Path.home() / ".cache" / "megatron_amir"))


def build_tokenizer(cfg: Config, corpus: list[str] | None = None):
    from megatron_amir.data.tokenizer import demo_tokenizer, load_tokenizer

    directory = cfg.data.tokenizer_dir or cfg.model.tokenizer
    if directory:
        return load_tokenizer(directory)
    if corpus is None:
        raise ValueError("data.tokenizer_dir is not set and there is no synthetic corpus to train the demo tokenizer on")
    return demo_tokenizer(cache_dir() / "tokenizers", corpus, vocab_size=min(cfg.model.vocab_size, 512))


def build_data(cfg: Config) -> tuple[Any, Any, list]:
    """(tokenizer, sampler over training problems, held-out problems)."""
    from megatron_amir.data.dataset import PromptSampler

    d = cfg.data
    if d.source == "synthetic":
        from megatron_amir.data.synthetic import corpus_lines, make_splits

        train, test = make_splits(d.synthetic)
        tokenizer = build_tokenizer(cfg, corpus_lines(train))
    else:
        from megatron_amir.data.dataset import load_prompts

        if d.source == "benchmark":
            from megatron_amir.data.benchmarks import load_benchmark

            train = load_benchmark(d.benchmark, d.train_path)
        else:
            train = load_prompts(d.train_path, on_bad_record=d.on_bad_record)
        test = load_prompts(d.test_path, on_bad_record=d.on_bad_record) if d.test_path else []
        tokenizer = build_tokenizer(cfg)
    return tokenizer, PromptSampler(train, seed=d.shuffle_seed), test
