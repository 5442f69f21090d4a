"""Build the trainer's data parts from the config: tokenizer, training-prompt sampler, held-out problems."""

from __future__ import annotations

import logging
from typing import Any, Optional

from megatron_amir.config import Config
from megatron_amir.fileio import cache_dir

log = logging.getLogger(__name__)


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
        # chat records become prompt text through the template; over-long prompts are dropped, with a report
        from megatron_amir.data.templates import prepare_prompts

        train, report = prepare_prompts(train, tokenizer, d.template, d.max_prompt_tokens)
        if report is not None:
            log.info("training prompts: %s", report.summary())
        if test:
            test, _ = prepare_prompts(test, tokenizer, d.template, d.max_prompt_tokens)
    return tokenizer, PromptSampler(train, seed=d.shuffle_seed), test


def bind_vocab(cfg: Config, tokenizer) -> None:
    """The embedding may have more rows than the tokenizer has ids (padding to a multiple of 128*TP, or a demo
    model sized in advance): record the real size so padding ids are never sampled nor given probability."""
    n = tokenizer.vocab_size
    if n > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary ({n}); "
                         "raise model.vocab_size")
    if cfg.model.real_vocab_size is None:
        cfg.model.real_vocab_size = n
    elif cfg.model.real_vocab_size < n:
        raise ValueError(f"model.real_vocab_size={cfg.model.real_vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({n})")


def rollout_hf_config(cfg: Config, tokenizer: Any = None, base: Optional[dict] = None) -> dict:
    """HF config.json of the model the rollout engine runs (and an export writes): the real vocabulary,
    padding rows dropped. ``base``: the source model's config.json, whose non-architecture keys are kept;
    token ids it lacks come from ``tokenizer``."""
    from megatron_amir.convert.hf_config import hf_config_from_model_config  # on use, as above: importing this module loads no torch

    base = dict(base or {})
    if tokenizer is not None:
        for key, tid in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                         ("pad_token_id", tokenizer.pad_id)):
            if base.get(key) is None and tid is not None:
                base[key] = int(tid)
    return hf_config_from_model_config(cfg.model, vocab_size=cfg.model.real_vocab_size, base=base)


def export_record(cfg: Config, hf_config: dict) -> dict:
    """What a checkpoint's meta.json needs for ``mcore-to-hf`` and for a run started from it: the tokenizer's
    vocabulary (rows beyond it are padding, dropped on export) and the HF config with the token ids."""
    return {"original_vocab_size": int(cfg.model.real_vocab_size or cfg.model.vocab_size), "hf_config": hf_config}
