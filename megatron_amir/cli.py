"""`megatron-amir` command line. Each subcommand lives in the module that owns it; this file only dispatches."""

from __future__ import annotations

import argparse
import sys

from megatron_amir.config import ConfigError, dump_config, load_config


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"megatron-amir: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
