"""The `tokenprune` command line."""

from __future__ import annotations

import argparse
import sys

import torch

import tokenprune as tp


def _run(args: argparse.Namespace) -> int:
    from tokenprune.run import load_model, load_run_config, measure, report

    config = load_run_config(args.config)
    torch.set_num_threads(args.threads) if args.threads else None
    model = load_model(config)
    print(report(model, config, measure(model, config)))
    return 0


def _list(args: argparse.Namespace) -> int:
    print("\n".join(tp.strategies() if args.command == "strategies" else tp.adapters()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenprune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure one reduction against the unreduced model")
    run.add_argument("config", help="YAML run config (see configs/llava-fastv.yaml)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.set_defaults(func=_run)
    for name in ("strategies", "adapters"):
        commands.add_parser(name, help=f"list the {name} available").set_defaults(func=_list)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except tp.TokenPruneError as exc:
        print(f"tokenprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
