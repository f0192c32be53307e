"""The `tokenprune` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

import tokenprune as tp
from tokenprune.errors import describe_errors

# What a command reports in one line and exit status 2: the library's own errors, and a config that
# does not parse or validate on a path that does not turn it into a ConfigError first.
USER_ERRORS = (tp.TokenPruneError, yaml.YAMLError, json.JSONDecodeError, ValidationError)


def _run(args: argparse.Namespace) -> int:
    from tokenprune.lab.run import load_run_config, load_run_model, measure, report

    config = load_run_config(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_run_model(config)
    print(report(model, config, measure(model, config)))
    return 0


def _ablate(args: argparse.Namespace) -> int:
    """Run the grid, then write the report, also when some cells failed (then raise, naming them)."""
    from tokenprune.lab.grid import parse_shard
    from tokenprune.lab.runner import CellsFailed, run_ablation

    shard = parse_shard(args.shard) if args.shard else None
    try:
        folder = run_ablation(args.config, shard, args.dry_run, args.output, args.threads)
    except CellsFailed as failed:
        if not args.no_report:
            _print_report(failed.folder)
        raise
    if not args.dry_run and not args.no_report:
        _print_report(folder)
    return 0


def _print_report(folder: Path) -> None:
    """Write the tables and figures of a run folder and print where (PDFs left out: one per PNG)."""
    from tokenprune.lab.report import build_report

    print(f"report: {', '.join(str(p) for p in build_report([folder]) if p.suffix != '.pdf')}")


def _report(args: argparse.Namespace) -> int:
    from tokenprune.lab.report import build_report

    for path in build_report(args.folders, args.out):
        print(path)
    return 0


def _list(args: argparse.Namespace) -> int:
    print("\n".join(tp.list_strategies() if args.command == "strategies" else tp.list_adapters()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenprune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure one reduction against the unreduced model")
    run.add_argument("config", help="YAML run config (see configs/llava-fastv.yaml)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.set_defaults(func=_run)
    ablate = commands.add_parser("ablate", help="run (or resume) a grid of reductions on a VQA dataset")
    ablate.add_argument("config", help="YAML ablation config (see configs/ablation-default.yaml)")
    ablate.add_argument("--dry-run", action="store_true", help="list the cells and whether each is done")
    ablate.add_argument("--shard", metavar="I/N", help="run every N-th cell from the I-th (0 <= I < N)")
    ablate.add_argument("--output", help="folder of run folders (default: the config's `output`, runs/)")
    ablate.add_argument("--no-report", action="store_true", help="skip the tables and figures at the end")
    ablate.add_argument("--threads", type=int, default=None, help="torch CPU threads (overrides `threads`)")
    ablate.set_defaults(func=_ablate)
    report = commands.add_parser("report", help="rebuild tables and figures from run folders (shards merge)")
    report.add_argument("folders", nargs="+", help="run folders holding results*.jsonl")
    report.add_argument("--out", help="where to write (default: the first folder)")
    report.set_defaults(func=_report)
    for name in ("strategies", "adapters"):
        commands.add_parser(name, help=f"list the {name} available").set_defaults(func=_list)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"tokenprune: error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """The message of a user-facing error on one line (pydantic's field by field, as the library words it)."""
    message = describe_errors(exc) if isinstance(exc, ValidationError) else str(exc)
    return " ".join(message.split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
