"""`dalle ...`: the command-line interface.

Each command group lives in `dalle.commands.<module>` with a `register(subparsers)` function that
adds its parser and sets `func(args) -> int`. Expected failures end as one `error:` line, exit 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from dalle.commands import config_cmd, dvae_cmd, dvc_cmd, generate_cmd, runs_cmd
from dalle.runner import ArgumentParser, configure_logging, run_guarded

# Command modules, in help order; each defines register(subparsers).
COMMAND_MODULES = (config_cmd, runs_cmd, dvae_cmd, generate_cmd, dvc_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dalle", description="DALL-E pipeline tools.")  # 1-line errors
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    code = run_guarded(lambda: args.func(args))
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
