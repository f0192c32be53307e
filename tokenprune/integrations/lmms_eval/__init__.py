"""tokenprune inside lmms-eval: the `tokenprune` model (any adapter, any reduction) and a task for anywhere.

lmms-eval finds the model through the entry point `tokenprune` of the group `lmms_eval.models`
(`manifest`, declared in pyproject.toml); the class is `model.TokenPruneLMM`. Tasks are found only in
lmms-eval's own folder or through `--include_path`: `python -m tokenprune.integrations.lmms_eval
--include-path` prints `TASKS_DIR`, which holds `tokenprune_toy_vqa` (see docs/lmms-eval.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_ID = "tokenprune"
TASKS_DIR = Path(__file__).parent / "tasks"


def manifest() -> Any:
    """The `ModelManifest` lmms-eval registers for `--model tokenprune` (lmms-eval imported only here)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.model.TokenPruneLMM")
