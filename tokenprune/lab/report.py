"""`tokenprune report RUN_DIR...`: tables and figures from the results rows of one or more run folders.

Writes `summary.csv` (every measured field), `summary.md` (the table for a paper), and figures as
PNG and PDF (`tokenprune.lab.figures`): accuracy vs a cost of your choice (`x`: tokens kept, decoder
FLOPs or total FLOPs with the vision tower) with the Pareto front, fidelity vs the budget in the
grid's unit, measured prefill speed-up vs the FLOPs bound, and per strategy the patches of the
sample image that survive (or the merge groups that form), one map per seed. Shards merge: give
every folder (or copy their results files into one). Rows of several seeds of one cell average
into one point, with error bars over the seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from tokenprune.errors import ConfigError
from tokenprune.lab.figures import fidelity_figure, pareto_figure, speedup_figure, survival_figures, x_axis
from tokenprune.lab.fingerprint import gather_rows, write_notes
from tokenprune.lab.tables import write_tables

SAMPLE_IMAGE = "sample.png"


def build_report(
    folders: Sequence[str | Path], out: str | Path | None = None, x: str = "flops", allow_mixed: bool = False
) -> list[Path]:
    """Every table and figure from the rows of `folders`, written to `out` (default: the first folder);
    `x` is the accuracy figure's cost axis (`tokenprune.lab.figures.X_AXES`). Rows of one key merge by
    `tokenprune.lab.results`' rule; rows of several run fingerprints are refused unless `allow_mixed`
    (`tokenprune.lab.fingerprint.gather_rows`); the notes on both end summary.md."""
    x_axis(x)  # an unknown axis is refused before anything is written
    folders = [Path(f) for f in folders]
    every, notes = gather_rows(folders, allow_mixed)
    rows = [row for row in every if "error" not in row]  # the measured cells; failed ones are listed
    if not rows:
        raise ConfigError(f"no measured results rows in {', '.join(map(str, folders))} (results*.jsonl)")
    out = Path(out) if out is not None else folders[0]
    out.mkdir(parents=True, exist_ok=True)
    written = write_tables(every, out)  # summary.csv, summary.md, comparisons.csv
    write_notes(out / "summary.md", notes)
    written += save(pareto_figure(rows, x), out / f"accuracy-vs-{x}")
    written += save(fidelity_figure(rows), out / "fidelity-vs-ratio")
    written += save(speedup_figure(rows), out / "speedup-vs-flops-bound")
    image = _sample_image(folders)
    for strategy, figure in survival_figures(rows, image).items():
        written += save(figure, out / f"survival-{strategy}")
    return written


def save(figure: Figure, stem: Path) -> list[Path]:
    """`stem.png` and `stem.pdf`, without timestamps (the same rows give the same files)."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    figure.savefig(paths[0], dpi=150, metadata={"Software": None})
    figure.savefig(paths[1], metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return paths


def _sample_image(folders: Sequence[Path]) -> Image.Image | None:
    """The sample image the runner saved in the first folder that has one."""
    for folder in folders:
        path = folder / SAMPLE_IMAGE
        if path.exists():
            with Image.open(path) as image:
                return image.convert("RGB")
    return None
