"""The `tokenprune` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import torch
import yaml
from pydantic import BaseModel, ValidationError

import tokenprune as tp
from tokenprune.errors import describe_errors
from tokenprune.registry import ADAPTERS, STRATEGIES, Registry

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


INTERRUPTED = 130  # the shell's status of a command ended by Ctrl-C (128 + SIGINT)


def _ablate(args: argparse.Namespace) -> int:
    """Run the grid, then write the report, also when some cells failed (then raise, naming them).

    Ctrl-C ends with one line on stderr (how many cells are saved) and status 130.
    """
    try:
        return _ablate_and_report(args)
    except KeyboardInterrupt as interrupted:  # runner.Interrupted says how many cells are saved
        print(interrupted or "interrupted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED


def _ablate_and_report(args: argparse.Namespace) -> int:
    """`_ablate` without its Ctrl-C handling."""
    from tokenprune.lab.grid import parse_shard
    from tokenprune.lab.runner import CellsFailed, run_ablation

    shard = parse_shard(args.shard) if args.shard else None
    options = {"restart": args.restart, "branch": args.branch}
    try:
        folder = run_ablation(args.config, shard, args.dry_run, args.output, args.threads, **options)
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

    if args.samples is not None:
        return _samples(args)

    for path in build_report(args.folders, args.out, x=args.x, allow_mixed=args.allow_mixed):
        print(path)
    return 0


def _samples(args: argparse.Namespace) -> int:
    """`report --samples CELL`: what the cell got wrong, and what it got right that the baseline did not."""
    from tokenprune.lab.fingerprint import gather_rows
    from tokenprune.lab.predictions import sample_listing

    rows, _ = gather_rows([Path(folder) for folder in args.folders], args.allow_mixed)
    print(sample_listing(rows, args.samples))
    return 0


def _list(args: argparse.Namespace) -> int:
    """`strategies [--params]`, `adapters`: what is installed, one line each (a broken plug-in says why)."""
    adapters = args.command == "adapters"
    registry = ADAPTERS if adapters else STRATEGIES
    entries = [_entry(registry, name, adapters) for name in registry.names()]
    for line, (_, cls) in zip(_aligned([columns for columns, _ in entries]), entries, strict=True):
        print(line)
        if getattr(args, "params", False) and cls is not None:
            print("\n".join(_parameter_lines(cls.Params)) or "    (no parameters)")
    return 0


def _entry(registry: Registry[Any], name: str, adapters: bool) -> tuple[list[str], Any]:
    """The columns of one name (name, [model types,] one-line doc) and its class (None: failed to load)."""
    try:
        cls = registry.get(name)
    except tp.PluginError as exc:
        return [name, *(["-"] if adapters else []), f"failed to load: {one_line(exc)}"], None
    served = [", ".join(cls.model_types) or "-"] if adapters else []
    return [name, *served, _first_line(cls.__doc__)], cls


def _aligned(rows: list[list[str]]) -> list[str]:
    """Rows of columns as lines, every column but the last padded to its widest cell."""
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    return ["  ".join(map(str.ljust, row, widths)).rstrip() for row in rows]


def _first_line(doc: str | None) -> str:
    """The summary line of a docstring."""
    return (doc or "").strip().split("\n")[0]


def _parameter_lines(params: type[BaseModel]) -> list[str]:
    """`    name: type = default  # description` per field of a strategy's Params model."""
    lines = []
    for name, field in params.model_fields.items():
        default = "required" if field.is_required() else f"= {field.get_default(call_default_factory=True)!r}"
        kind = _type_name(field.annotation) + _bounds(field.metadata)
        note = f"  # {field.description}" if field.description else ""
        lines.append(f"    {name}: {kind} {default}{note}")
    return lines


def _type_name(annotation: Any) -> str:
    """A type as a config writes it: `int`, `'last' | 'mean' | None`, `int >= 0 | list[int >= 0] | None`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0]) + _bounds(args[1:])
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (Union, UnionType):
        return " | ".join(map(_type_name, args))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(map(_type_name, args))}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: Sequence[Any]) -> str:
    """Numeric bounds of a pydantic field or Annotated type: ` >= 0`, ` > 0 <= 1`."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return "".join(
        f" {sign} {getattr(m, bound)}" for m in metadata for bound, sign in signs.items() if hasattr(m, bound)
    )


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
    other_run = ablate.add_mutually_exclusive_group()
    other_run.add_argument(
        "--restart",
        action="store_true",
        help="a folder of another run's fingerprint: move it aside, start over",
    )
    other_run.add_argument(
        "--branch", metavar="NAME", help="run into <name>-NAME, beside the config's folder"
    )
    ablate.set_defaults(func=_ablate)
    report = commands.add_parser("report", help="rebuild tables and figures from run folders (shards merge)")
    report.add_argument("folders", nargs="+", help="run folders holding results*.jsonl")
    report.add_argument("--out", help="where to write (default: the first folder)")
    report.add_argument(
        "--samples",
        metavar="CELL",
        help="write nothing; list the samples the cell (index, key or label) got wrong, and those it got "
        "right that the baseline got wrong",
    )
    report.add_argument(
        "--allow-mixed", action="store_true", help="put rows of different run fingerprints in one table"
    )
    report.add_argument(
        "--x",
        default="flops",
        help="cost axis of the accuracy figure: tokens (visual tokens kept), flops (decoder prefill FLOPs, "
        "the default) or total-flops (decoder + vision tower); written as accuracy-vs-X.png",
    )
    report.set_defaults(func=_report)
    strategies = commands.add_parser("strategies", help="list the strategies installed, with one-line docs")
    strategies.add_argument("--params", action="store_true", help="each parameter's type, default and doc")
    strategies.set_defaults(func=_list)
    adapters = commands.add_parser("adapters", help="list the adapters and the model types they serve")
    adapters.set_defaults(func=_list)
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
