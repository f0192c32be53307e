"""The ablation dataset source `lmms-eval`: every cell of a grid run through lmms-eval's evaluator.

With `dataset: {source: lmms-eval, tasks: [gqa, mme], limit: 500}` (the lmms-eval extra installed),
the model of the config is loaded once, by the lab's loader, and wrapped in lmms-eval's `tokenprune`
model, which the lab finds by name in lmms-eval's registry, as `--model tokenprune` is found (the
integration sits above the lab, which never imports it). Each cell sets its reduction on that model
and runs `lmms_eval.evaluator.simple_evaluate` on the tasks, `limit` documents each. A row holds:

- `lmms_eval`: per task, its metrics as lmms-eval reports them (`{task: {metric: value}}`; the `,none`
  filter suffix dropped, standard errors left out), and `lmms_eval_costs`: per task, the model's
  costs (its sidecar's `tasks`, docs/lmms-eval.md);
- `accuracy_exact`: when every task reports one (as `tokenprune_toy_vqa` does), their mean;
- the cost columns of `tokenprune ablate` over every request answered: visual tokens before and
  after, decoder prefill FLOPs and their ratio to the baseline's;
- the timing columns of `tokenprune ablate` (the same functions), on the timing batch: the first
  batch the model answered in the unreduced run.

Tasks are looked up among tokenprune's own (`tokenprune_toy_vqa`) first, among lmms-eval's only when
one is not there (indexing lmms-eval's hundreds of tasks takes seconds).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tokenprune as tp
from tokenprune.errors import ConfigError
from tokenprune.lab.bench import BaseBench, baseline_footprint, identity, open_model
from tokenprune.lab.config import AblationConfig
from tokenprune.lab.datasets import LMMS_EVAL_SOURCE
from tokenprune.lab.grid import Cell

MODEL_NAME = "tokenprune"  # the integration's model id in lmms-eval's registry


@dataclass(frozen=True)
class Evaluation:
    """One cell's lmms-eval results: per task, its metrics, its documents and the model's costs."""

    metrics: dict[str, dict[str, float]]
    documents: dict[str, int]
    costs: dict[str, dict[str, Any]]


@dataclass
class LmmsBench(BaseBench):
    """A bench through lmms-eval: its `tokenprune` model around the loaded model, the task index and the
    unreduced run's results; the timing batch is the first batch the model answered unreduced."""

    lmm: Any  # tokenprune.integrations.lmms_eval.model.TokenPruneLMM, from lmms-eval's registry
    task_manager: Any  # lmms_eval.tasks.TaskManager
    baseline: Evaluation

    @classmethod
    def open(cls, config: AblationConfig, config_file: Path, fingerprint: str) -> LmmsBench:
        """Load the model, index the tasks, run them unreduced (the baseline) and measure its memory."""
        model_class = lmms_model_class()
        loaded = open_model(config)
        lmm = model_class.from_loaded(loaded, config.model.source, None, config.batch_size)
        manager = task_manager(config_file, config.dataset.tasks, model_class.include_path())
        baseline = run_tasks(lmm, manager, config, None)
        timed = lmm.first_batch
        base = baseline_footprint(loaded, timed, config)
        return cls(config, config_file, loaded, timed, base, fingerprint, lmm, manager, baseline)

    def measure(self, cell: Cell) -> dict[str, Any]:
        """The results row of one cell."""
        start = time.perf_counter()
        result = (
            self.baseline
            if cell.reduction is None
            else run_tasks(self.lmm, self.task_manager, self.config, cell.reduction)
        )
        return {
            **identity(cell),
            **self.context(),
            "lmms_eval_tasks": self.config.dataset.tasks,
            "lmms_eval_limit": self.config.dataset.limit,
            "samples": sum(result.documents.values()),
            "lmms_eval": result.metrics,
            **headline(result.metrics),
            **cost_fields(result.costs, self.baseline.costs),
            "lmms_eval_costs": result.costs,
            **self.timings(cell.reduction),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - start,
        }


def lmms_model_class() -> Any:
    """lmms-eval's `tokenprune` model class (its registry loads the entry point), or what to install."""
    try:
        from lmms_eval.models import get_model
    except ImportError:
        raise ConfigError(
            f"dataset source {LMMS_EVAL_SOURCE!r} needs lmms-eval: pip install 'tokenprune-vlm[lmms-eval]'"
        ) from None
    return get_model(MODEL_NAME)


def task_manager(config_file: Path, tasks: list[str], include_path: Path) -> Any:
    """lmms-eval's index of tokenprune's tasks, and of its own when a task is not among tokenprune's."""
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(include_path), include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager("WARNING", include_path=str(include_path))
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ConfigError(f"{config_file}: dataset.tasks: no lmms-eval task named {', '.join(unknown)}")
    return manager


def run_tasks(
    lmm: Any, manager: Any, config: AblationConfig, reduction: tp.ReductionConfig | None
) -> Evaluation:
    """The config's tasks through lmms-eval's evaluator with `reduction` on the model (None: unreduced)."""
    from lmms_eval.evaluator import simple_evaluate

    lmm.reduction = reduction
    lmm.costs.reset()
    results = simple_evaluate(
        model=lmm,
        tasks=list(config.dataset.tasks),
        limit=config.dataset.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    documents = {task: int(counts["effective"]) for task, counts in results["n-samples"].items()}
    return Evaluation(task_metrics(results["results"]), documents, lmm.efficiency()["tasks"])


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task, its numeric metrics (`metric,filter`; the `none` filter named by the metric alone)."""
    return {
        task: {
            key.removesuffix(",none"): float(value)
            for key, value in values.items()
            if "_stderr" not in key and isinstance(value, int | float) and not isinstance(value, bool)
        }
        for task, values in results.items()
    }


def headline(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """`accuracy_exact`: the mean over the tasks when every task reports it; else nothing."""
    if not all("accuracy_exact" in values for values in metrics.values()):
        return {}
    return {"accuracy_exact": statistics.mean(values["accuracy_exact"] for values in metrics.values())}


def cost_fields(costs: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`tokenprune ablate`'s cost columns, means over every request of every task, against the baseline."""
    flops, base = _mean(costs, "prefill_flops"), _mean(baseline, "prefill_flops")
    return {
        "visual_tokens_before": _mean(costs, "visual_tokens_before"),
        "visual_tokens_after": _mean(costs, "visual_tokens_kept"),
        "prefill_flops": flops,
        "baseline_prefill_flops": base,
        "flops_ratio": flops / base,
        "tower_flops": None,
        "baseline_tower_flops": None,
    }


def _mean(costs: dict[str, dict[str, Any]], field: str) -> float:
    """A per-sample mean of the tasks' costs, weighted by their samples."""
    samples = sum(task["samples"] for task in costs.values())
    return sum(task[field] * task["samples"] for task in costs.values()) / samples
