"""Per-sample predictions of a cell: which sample, what the cell answered, whether it was right.

A results row holds them beside its measurements, so they are written in the row's one append,
resumed, merged across shards and fingerprinted with it: `predictions`, the decoded answers in
dataset order, and `per_sample`, lists of the same length and order:

- `id`, `question`, `answers`: the sample (its id in the dataset, the question, the accepted answers);
- `correct`: exact match, as `accuracy_exact` counts it (`tokenprune.lab.metrics.exact_matches`);
- `answer_logprob`: the first-step log-probability (nats, rounded to `LOGPROB_DECIMALS` places) of the
  first token of the first accepted answer as the prompt continues (`tokenprune.lab.batches.answer_token`);
  None where no token could be scored.

`tokenprune report RUN --samples CELL` lists what a cell got wrong (`sample_listing`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenprune.errors import ConfigError
from tokenprune.lab.batches import Batch
from tokenprune.lab.metrics import Outputs, exact_matches
from tokenprune.lab.results import Row, baseline_for

LOGPROB_DECIMALS = 5  # 1e-5 nats: far below any difference worth reading, and a short JSON number


def prediction_fields(outputs: Outputs, batches: Sequence[Batch]) -> dict[str, Any]:
    """The `predictions` and `per_sample` fields of a cell's row, from its outputs and the batches."""
    answers = [a for batch in batches for a in batch.answers]
    return {
        "predictions": outputs.predictions,
        "per_sample": {
            "id": [i for batch in batches for i in batch.ids],
            "question": [q for batch in batches for q in batch.questions],
            "answers": answers,
            "correct": exact_matches(outputs.predictions, answers),
            "answer_logprob": [_rounded(x) for x in outputs.answer_logprobs],
        },
    }


def _rounded(logprob: float | None) -> float | None:
    """A log-probability rounded for the row; None for none or one that is not finite."""
    return None if logprob is None or not math.isfinite(logprob) else round(logprob, LOGPROB_DECIMALS)


@dataclass(frozen=True)
class SamplePredictions:
    """The per-sample columns of one row, in dataset order."""

    ids: list[str]
    questions: list[str]
    answers: list[list[str]]
    predictions: list[str]
    correct: list[bool]
    answer_logprobs: list[float | None]

    @classmethod
    def of(cls, row: Row) -> SamplePredictions:
        """The columns of `row`; ConfigError for a row written without them."""
        if not has_predictions(row):
            raise ConfigError(
                f"cell {row.get('label')!r} (key {row.get('key')}) has no per-sample predictions: its row "
                "was written by a version that did not record them; measure it again (rerun the run "
                "with `tokenprune ablate CONFIG --restart`, or into another folder)"
            )
        columns = row["per_sample"]
        return cls(
            columns["id"],
            columns["question"],
            columns["answers"],
            row["predictions"],
            columns["correct"],
            columns["answer_logprob"],
        )

    def same_samples(self, other: SamplePredictions) -> bool:
        """Whether both are over the same samples in the same order (what a paired comparison needs)."""
        return self.ids == other.ids


def has_predictions(row: Row) -> bool:
    """Whether a row records per-sample predictions."""
    return isinstance(row.get("per_sample"), dict) and isinstance(row.get("predictions"), list)


def find_row(rows: Sequence[Row], cell: str) -> Row:
    """The measured row that `cell` names: its key, its label, or its index in the grid."""
    measured = [row for row in rows if "error" not in row]
    for field, value in (("key", cell), ("label", cell), ("index", _index(cell))):
        found = [row for row in measured if value is not None and row.get(field) == value]
        if len(found) > 1:
            keys = ", ".join(row["key"] for row in found)
            raise ConfigError(f"cell {cell!r} names {len(found)} rows (keys {keys}): give a key")
        if found:
            return found[0]
    labels = ", ".join(f"{row.get('index')}: {row.get('label')}" for row in measured)
    raise ConfigError(f"no measured cell {cell!r} (give an index, a key or a label); cells: {labels}")


def _index(cell: str) -> int | None:
    """`cell` as a grid index, or None when it is not a whole number."""
    return int(cell) if cell.isdigit() else None


def sample_listing(rows: Sequence[Row], cell: str) -> str:
    """What a cell got wrong, and what it got right that the baseline got wrong, as text tables."""
    row = find_row(rows, cell)
    mine = SamplePredictions.of(row)
    wrong = [i for i, right in enumerate(mine.correct) if not right]
    lines = [
        f"{row['label']} (cell {row.get('index')}, key {row['key']}): "
        f"{len(wrong)} of {len(mine.ids)} answers wrong (exact match)",
        *_sample_table(mine, wrong),
    ]
    baseline = baseline_for(rows, row)
    if baseline is None or not has_predictions(baseline):
        return "\n".join([*lines, "", "no baseline row with per-sample predictions to compare with"])
    reference = SamplePredictions.of(baseline)
    if not reference.same_samples(mine):
        return "\n".join([*lines, "", "the baseline row is on other samples: no comparison"])
    gained = [i for i, (a, b) in enumerate(zip(mine.correct, reference.correct, strict=True)) if a and not b]
    title = f"right where the baseline was wrong: {len(gained)}"
    return "\n".join([*lines, "", title, *_sample_table(mine, gained, reference)])


def _sample_table(
    mine: SamplePredictions, positions: Sequence[int], baseline: SamplePredictions | None = None
) -> list[str]:
    """Aligned text columns (id, question, prediction, reference; the baseline's answer when given)."""
    if not positions:
        return []
    headers = ["id", "question", "prediction", "reference"] + (["baseline"] if baseline else [])
    table = [headers]
    for i in positions:
        line = [mine.ids[i], mine.questions[i], mine.predictions[i], " | ".join(mine.answers[i])]
        table.append(line + ([baseline.predictions[i]] if baseline else []))
    widths = [max(len(line[c]) for line in table) for c in range(len(headers))]
    return [
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]
