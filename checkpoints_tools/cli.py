"""`megatron-amir convert hf-to-mcore|mcore-to-hf|mcore-to-peft ...` (launch/cli.py dispatches here): arguments
and messages only; the conversions are the library's (megatron_amir.convert)."""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_amir.convert.hf_io import HFCheckpointError
from megatron_amir.convert.hf_to_mcore import hf_to_mcore
from megatron_amir.convert.mapping import MappingError
from megatron_amir.convert.mcore_to_hf import mcore_to_hf


def build_parser(prog: str = "megatron-amir convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Hugging Face <-> Megatron-Core checkpoint conversion")
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors dir -> Megatron torch_dist checkpoint")
    a.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint targets (vocab padding)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint targets (validated)")
    a.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="Megatron parameter dtype (default: the HF config's)")
    a.add_argument("--fsync", action="store_true",
                   help="flush the checkpoint to disk before publishing it (survives power loss; slower)")
    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint (converted or trainer step dir) -> HF dir")
    b.add_argument("--ckpt", required=True, help="directory holding model/ and its metadata")
    b.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    b.add_argument("--max-shard-size", default="5GB", help="safetensors shard size limit (default 5GB)")
    b.add_argument("--vocab-size", type=int, default=None, help="rows to keep (default: recorded original vocab)")
    b.add_argument("--lora", choices=("merge", "base"), default="merge",
                   help="a checkpoint with LoRA adapters: merged weights W + s*B*A (default) or the base alone")
    c = sub.add_parser("mcore-to-peft", help="LoRA adapters of a Megatron checkpoint -> HF PEFT adapter dir")
    c.add_argument("--ckpt", required=True, help="directory holding model/ and its metadata")
    c.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    c.add_argument("--base", default=None, help="base_model_name_or_path for adapter_config.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.direction == "hf-to-mcore":
            meta = hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, fsync=args.fsync)
            print(f"wrote {args.out} ({meta['model']['arch']}, vocab {meta['original_vocab_size']} padded to "
                  f"{meta['padded_vocab_size']})")
        elif args.direction == "mcore-to-peft":
            from megatron_amir.convert.peft_export import mcore_to_peft

            mcore_to_peft(args.ckpt, args.out, base_model_name_or_path=args.base)
            print(f"wrote {args.out} (adapter_config.json, adapter_model.safetensors)")
        else:
            files = mcore_to_hf(args.ckpt, args.out, max_shard_size=args.max_shard_size, vocab_size=args.vocab_size,
                                lora=args.lora)
            print(f"wrote {args.out} ({len(files)} safetensors file(s))")
    except (HFCheckpointError, MappingError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"megatron-amir convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
