"""`dalle dvc-yaml [--check]`: write dvc.yaml from the stage declarations, or check it is current."""
from __future__ import annotations

import argparse
from pathlib import Path

from dalle.config import REPO_ROOT
from dalle.dvcgen import render
from dalle.errors import ConfigError
from dalle.io import write_text
from dalle.pipeline import STAGES


def _run(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    text = render(STAGES, root)
    path = root / "dvc.yaml"
    if args.check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            raise ConfigError(f"{path} is not the one the stage declarations give; run "
                              "`dalle dvc-yaml` and commit it")
        print(f"{path} is current")
        return 0
    write_text(path, text)
    print(f"wrote {path} ({len(STAGES)} stages)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage declarations")
    p.add_argument("--check", action="store_true", help="only check that dvc.yaml is current")
    p.add_argument("--root", default=str(REPO_ROOT), help="the repository (default: this one)")
    p.set_defaults(func=_run)
