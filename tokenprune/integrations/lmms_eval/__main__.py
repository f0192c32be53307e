"""`python -m tokenprune.integrations.lmms_eval --include-path`: the folder for `--include_path`."""

from __future__ import annotations

import argparse

from tokenprune.integrations.lmms_eval import TASKS_DIR


def main(argv: list[str] | None = None) -> None:
    """Print the tasks folder shipped with tokenprune (the only action, so that `$(...)` can use it)."""
    parser = argparse.ArgumentParser(
        prog="python -m tokenprune.integrations.lmms_eval",
        description="tokenprune's lmms-eval tasks (tokenprune_toy_vqa): where they are.",
    )
    parser.add_argument(
        "--include-path", action="store_true", required=True, help="print the folder for --include_path"
    )
    parser.parse_args(argv)
    print(TASKS_DIR)


if __name__ == "__main__":
    main()
