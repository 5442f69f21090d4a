"""A GGUF file (llama.cpp's format, often quantized) -> a normal Hugging Face directory of dequantized weights.

``transformers`` reads a GGUF file itself (``from_pretrained(dir, gguf_file=name)``, with the ``gguf`` package):
it dequantizes every tensor to float32 and builds the tokenizer and chat template from the file's metadata.
It refuses to ``save_pretrained`` that model (it carries a GGUF ``quantization_config``), so the weights are
copied into a fresh model built from the same config without it, and that one is saved. The result loads in
stock ``transformers`` (and vLLM) without ``gguf``, and is what ``convert hf-to-mcore`` reads.

Needs the ``real`` extra (``pip install -e ".[real]"``: gguf, accelerate).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from megatron_amir.fileio import atomic_write_text, publish_mode

__all__ = ["sha256_file", "gguf_to_hf", "RECORD_NAME"]

RECORD_NAME = "gguf_source.json"  # written last into the output directory: its presence marks a finished one


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> dict[str, Any]:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files, chat template) from ``gguf_path``.

    Idempotent: an ``out_dir`` that already holds the record of a conversion of a file with the same sha256 is
    kept as is. The directory is built beside ``out_dir`` and renamed into place, so a killed conversion leaves
    no half directory. Returns the record: source name, size and sha256, architecture, parameter count and the
    sha256 of the written weights.
    """
    import torch

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    digest = sha256_file(gguf_path)
    record_path = out_dir / RECORD_NAME
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("gguf_sha256") == digest:
            return record
        raise ValueError(f"{out_dir} holds a conversion of another GGUF file (sha256 {record.get('gguf_sha256')}, "
                         f"this one {digest}); delete it or choose another directory")
    if out_dir.exists():
        raise ValueError(f"{out_dir} exists but holds no {RECORD_NAME}: an unfinished conversion or another "
                         "directory; delete it first")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; say so here rather than deep inside)
    except ImportError as e:
        raise ImportError(f"reading GGUF needs the 'gguf' package: pip install -e '.[real]' ({e})") from e

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    src_dir, name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # a tied lm_head is not in the state dict of either; anything else missing would be random weights
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{gguf_path}: the dequantized weights do not fit {type(plain).__name__} "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    plain.generation_config = quantized.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    publish_mode(tmp, directory=True)  # a shared cache: readable like a plain mkdir
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "gguf_file": name, "gguf_bytes": gguf_path.stat().st_size, "gguf_sha256": digest,
            "architecture": type(plain).__name__, "parameters": sum(p.numel() for p in plain.parameters()),
            "dtype": dtype, "weights_sha256": {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))},
        }
        atomic_write_text(tmp / RECORD_NAME, json.dumps(record, indent=1) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
