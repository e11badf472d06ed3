"""`dalle config validate|show`."""
from __future__ import annotations

import argparse
import json

import yaml

from dalle.config import load_params


def add_params_args(parser: argparse.ArgumentParser) -> None:
    """--params/--preset/-S, shared by every command that reads params."""
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--preset", default=None, help="overlay presets/<NAME>.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one param")


def _validate(args: argparse.Namespace) -> int:
    load_params(args.params, args.preset, args.overrides)
    print("ok")
    return 0


def _show(args: argparse.Namespace) -> int:
    params = load_params(args.params, args.preset, args.overrides)
    data = params.model_dump(mode="json")
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="validate or show the resolved params")
    actions = config.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    validate = actions.add_parser("validate", help="print `ok` or the one problem, exit 1 on error")
    add_params_args(validate)
    validate.set_defaults(func=_validate)
    show = actions.add_parser("show", help="print the resolved config (params + preset + -S)")
    add_params_args(show)
    show.add_argument("--format", choices=("yaml", "json"), default="yaml")
    show.set_defaults(func=_show)
