"""Prompt data: the synthetic task (``synthetic``), tokenizers (``tokenizer``), prompt datasets with
validation and a resumable sampler (``dataset``), templates (``templates``) and local benchmark loaders
(``benchmarks``). Import the submodules directly; nothing heavy is imported here."""
