"""Up-front checks of an ablation: everything that can be checked before a cell computes.

`--dry-run` and the start of every run call `check_ablation`: it reads the model's config (never its
weights) and the dataset's first records, and raises one ConfigError listing every problem found:

- decoder layers of the grid past the model's decoder layers;
- vision layers of `site: vision` stages past the vision layer that feeds the projector (the
  vision config's depth and `vision_feature_layer`);
- a `keep` larger than the visual tokens of a sample: per image, (image_size / patch_size)^2 of the
  vision config (plus the class token with `vision_feature_select_strategy: full`), times the
  fewest images of the first records (`budget: per_frame`: one image);
- the dataset: its path, the fields of its first records and their image files.

Models whose config does not give their visual tokens (Qwen2-VL's grids follow each image, LLaVA-NeXT
adds tiles) have their keeps checked on the first processed batch (`check_batch_keeps`), still
before any cell computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenprune.contracts.layout import VisualLayout
from tokenprune.errors import ConfigError
from tokenprune.lab.config import AblationConfig
from tokenprune.lab.datasets import LMMS_EVAL_SOURCE, preview
from tokenprune.lab.fingerprint import BUILTIN_FOLDERS
from tokenprune.lab.grid import Cell, expand_grid
from tokenprune.lab.loading import BUILTIN_MODELS

PREVIEW_RECORDS = 8  # dataset records validated up front


def check_ablation(config: AblationConfig, config_file: Path) -> None:
    """Raise one ConfigError naming the file and every problem found; nothing when there is none."""
    cells = expand_grid(config, dataset="not read yet")  # their labels and budgets; keys unused
    problems: list[str] = []
    images = _fewest_images(config, problems)
    try:
        model = model_config(config.model.source)
    except ConfigError as exc:
        problems.append(str(exc))
    else:
        problems += layer_problems(config, model)
        per_image = visual_tokens_per_image(model)
        if per_image is not None and images is not None:
            problems += keep_problems(cells, per_image * images, per_image, "from the model's config")
    _raise(config_file, problems)


def _fewest_images(config: AblationConfig, problems: list[str]) -> int | None:
    """The fewest images of a sample among the dataset's first records (None: lmms-eval's tasks, which
    lmms-eval reads, or a dataset with a problem, added to `problems`)."""
    spec = config.dataset
    if spec.source == LMMS_EVAL_SOURCE:
        return None
    try:
        return min(preview(spec.source, spec.split, spec.limit, spec.seed, PREVIEW_RECORDS))
    except ConfigError as exc:
        problems.append(str(exc))
        return None


def _raise(config_file: Path, problems: list[str]) -> None:
    """One ConfigError listing the problems, numbered, or nothing when there are none."""
    if len(problems) == 1:
        raise ConfigError(f"{config_file}: {problems[0]}")
    if problems:
        listed = " ".join(f"({n}) {problem}" for n, problem in enumerate(problems, start=1))
        raise ConfigError(f"{config_file}: {len(problems)} problems found before running: {listed}")


def model_config(source: str) -> Any:
    """The model's transformers config, read without its weights (a seeded builtin is built: it is tiny)."""
    from transformers import AutoConfig

    folder = BUILTIN_FOLDERS.get(source)
    if source.startswith("builtin:") and folder is None:
        if source not in BUILTIN_MODELS:
            raise ConfigError(f"unknown builtin model {source!r}; known: {', '.join(BUILTIN_MODELS)}")
        return BUILTIN_MODELS[source]("sdpa")[0].config
    try:
        return AutoConfig.from_pretrained(folder or source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {source!r}: cannot read its config: {exc}") from None


def layer_problems(config: AblationConfig, model: Any) -> list[str]:
    """Grid fields naming decoder layers past the model's, or vision layers past the projector's input."""
    depth = model.get_text_config().num_hidden_layers
    problems = _past(
        config.grid.named_layers("language"), depth, f"the model's {depth} decoder layers (0..{depth - 1})"
    )
    vision = config.grid.named_layers("vision")
    if vision:
        limit, what = vision_depth(model)
        problems += _past(vision, limit, what)
    return problems


def _past(named: dict[str, set[int]], limit: int, what: str) -> list[str]:
    """`field: layer(s) [..] past <what>` for each field naming a layer >= limit."""
    problems = []
    for field, layers in named.items():
        too_deep = sorted(layer for layer in layers if layer >= limit)
        if too_deep:
            problems.append(f"{field}: layer(s) {too_deep} past {what}")
    return problems


def vision_depth(model: Any) -> tuple[int, str]:
    """How many vision layers a `site: vision` stage may name, and in words which they are."""
    vision = getattr(model, "vision_config", None)
    depth = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None)
    if depth is None:
        return 0, "the vision layers of a model without a vision config"
    feature = getattr(model, "vision_feature_layer", None)
    if not isinstance(feature, int) or feature == 0:
        return depth, f"the vision config's {depth} layers (0..{depth - 1})"
    last = depth + feature if feature < 0 else feature - 1  # hidden_states[k] is layer k - 1's output
    return last + 1, f"vision layer {last}, the one feeding the projector (vision_feature_layer={feature})"


def visual_tokens_per_image(model: Any) -> int | None:
    """Visual tokens one image becomes, when a LLaVA-1.5-style config says it (None otherwise)."""
    if model.model_type not in ("llava", "video_llava"):
        return None
    vision = model.vision_config
    side = vision.image_size // vision.patch_size
    return side * side + (getattr(model, "vision_feature_select_strategy", None) == "full")


def keep_problems(cells: Sequence[Cell], per_sample: int, per_frame: int, source: str) -> list[str]:
    """Each `keep` larger than the visual tokens it counts from (a sample's, or a frame's with per_frame)."""
    found: dict[tuple[int, int], list[str]] = {}
    for cell in cells:
        if cell.reduction is None:
            continue
        tokens = per_frame if cell.reduction.budget == "per_frame" else per_sample
        for keep in {stage.keep for stage in cell.reduction.stages if stage.keep is not None}:
            if keep > tokens:
                found.setdefault((keep, tokens), []).append(cell.label)
    return [
        f"keep={keep} > the {tokens} visual tokens it counts from ({source}): {', '.join(labels)}"
        for (keep, tokens), labels in sorted(found.items())
    ]


def check_batch_keeps(config_file: Path, cells: Sequence[Cell], layout: VisualLayout | None) -> None:
    """Refuse keeps larger than the visual tokens of a sample in the first processed batch, or with
    `budget: per_frame` than its largest frame grid (smaller grids, such as a video frame's class
    token, keep all of theirs: the budget caps nothing there, the keep still applies to the others)."""
    if layout is None:
        return
    per_sample = int(layout.visual.sum(dim=1).min())
    per_frame = min(int(row[row >= 0].bincount().max()) for row in layout.frame if (row >= 0).any())
    source = "the fewest of a sample in the first batch"
    _raise(config_file, keep_problems(cells, per_sample, per_frame, source))
