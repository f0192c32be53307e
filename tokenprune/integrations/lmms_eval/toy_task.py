"""The `tokenprune_toy_vqa` lmms-eval task: the built-in toy VQA test split as a JSONL file and its scoring.

`tasks/tokenprune_toy_vqa/test.jsonl` holds `RECORDS` samples of `builtin:toy-vqa`'s test split
(seed 0): one line per sample with its id, question, answers and scene (the objects drawn). The
images are not stored: `doc_to_visual` draws each scene again with `tokenprune.builtin.toyvqa.render`,
so the first n lines are exactly the samples `tokenprune ablate` asks with `limit: n`.
`write_records()` regenerates the file (tests/test_lmms_eval.py checks it is current). Scoring is the
lab's own (`tokenprune.lab.metrics.accuracy`): the metric names and values are those of an ablation row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from tokenprune.builtin.models import builtin_dataset
from tokenprune.builtin.toyvqa import Shape, render
from tokenprune.integrations.lmms_eval import TASKS_DIR
from tokenprune.lab.metrics import accuracy

TASK = "tokenprune_toy_vqa"
RECORDS = 512  # the held-out size the toy model's 100% was measured on (tokenprune.json)
DATA_FILE = TASKS_DIR / TASK / "test.jsonl"
METRICS = ("accuracy_exact", "accuracy_contains")


def records(n: int = RECORDS, seed: int = 0) -> list[dict[str, Any]]:
    """The first `n` samples of the toy VQA test split as JSON records (the scene instead of the image)."""
    return [
        {
            "id": sample.id,
            "question": sample.question,
            "answers": sample.answers,
            "objects": [[obj.row, obj.col, obj.colour, obj.shape] for obj in sample.objects],
        }
        for sample in builtin_dataset("builtin:toy-vqa", "test", n, seed)
    ]


def write_records(path: Path = DATA_FILE) -> None:
    """Write the task's JSONL file (run after a change to the toy task's generator)."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records()))


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The sample's image, drawn from its scene."""
    return [render(tuple(Shape(*obj) for obj in doc["objects"]))]


def doc_to_text(doc: dict[str, Any]) -> str:
    """The question alone: the model's prompt template (the toy's own, or a chat template) frames it."""
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact and contains match of the answer, as `tokenprune ablate` scores it."""
    return accuracy([results[0]], [doc["answers"]])
