"""`megatron-amir` command line. Each subcommand lives in the module that owns it; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

from megatron_amir.config import ConfigError, dump_config, load_config, reference_arguments, write_reference

# subcommand -> (module with main(argv), one-line help). Only commands that work are listed.
DELEGATED = {
    "train": ("megatron_amir.training.trainer", "run the AMIR-GRPO / GRPO trainer (resumes automatically)"),
    "sft": ("megatron_amir.training.sft", "supervised warm-up on the task's reference solutions"),
    "convert": ("checkpoints_tools.cli", "convert checkpoints: hf-to-mcore | mcore-to-hf | mcore-to-peft"),
    "serve": ("megatron_amir.rollout.server", "embedded rollout server speaking vLLM's /v1/completions subset"),
    "eval": ("megatron_amir.eval.runner", "evaluate a model on a benchmark: pass@k, maj@k, lengths"),
    "compare": ("megatron_amir.eval.compare", "compare runs: coverage, log-prob margins, bootstrap CIs"),
    "study": ("megatron_amir.eval.study", "multi-seed reproduction study report"),
}


def _config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-amir", description="AMIR-GRPO post-training on Megatron-Core")
    sub = p.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="inspect configs")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    show = cfg_sub.add_parser("show", help="print the resolved, validated config")
    show.add_argument("config", help="YAML config file")
    show.add_argument("overrides", nargs="*", help="key.path=value overrides")
    show.set_defaults(func=_config_show)
    docs = cfg_sub.add_parser("docs", parents=[reference_arguments()],
                              help="regenerate docs/config.md, the reference of every config key")
    docs.set_defaults(func=lambda a: write_reference(a.out, check=a.check))
    for name, (_module, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:  # the owning module parses its own arguments
            module = importlib.import_module(DELEGATED[argv[0]][0])
            return int(module.main(argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"megatron-amir: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
