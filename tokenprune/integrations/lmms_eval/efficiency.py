"""What a reduction costs per lmms-eval task: visual tokens kept, prefill FLOPs, prefill and selection time.

The `tokenprune` model adds each batch it answers to the `Efficiency` of its run, under the batch's
task, and writes `Efficiency.summary()` as a sidecar JSON file (the format: docs/lmms-eval.md):

- `visual_tokens_before` / `visual_tokens_kept`: per sample, the visual tokens the adapter lays out
  and those left after the last language-model stage (equal when unreduced or reduced in a tower only);
- `prefill_flops`: per sample, the decoder's prefill FLOPs as reduced (`tokenprune.flops.trace_flops`);
- `prefill_s_per_batch`: seconds from the `generate` call to the first token's logits (time to first
  token: the vision tower and the prefill), per batch; for a loglikelihood request, its context's forward;
- `overhead_s_per_batch`: of that, the seconds the strategy spent choosing tokens (`Handle.time_selections`);
  None when unreduced.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "tokenprune-lmms-eval-efficiency/1"


@dataclass
class TaskCosts:
    """The per-sample and per-batch numbers of one task's batches, as they were answered."""

    visual_before: list[int] = field(default_factory=list)
    visual_kept: list[int] = field(default_factory=list)
    prefill_flops: list[int] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    overhead_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Means per sample (tokens, FLOPs) and per batch (seconds), with the totals of the seconds."""
        return {
            "samples": len(self.visual_kept),
            "batches": len(self.prefill_s),
            "visual_tokens_before": statistics.mean(self.visual_before),
            "visual_tokens_kept": statistics.mean(self.visual_kept),
            "prefill_flops": statistics.mean(self.prefill_flops),
            "prefill_s_per_batch": statistics.mean(self.prefill_s),
            "prefill_s_total": sum(self.prefill_s),
            "overhead_s_per_batch": statistics.mean(self.overhead_s) if self.overhead_s else None,
            "overhead_s_total": sum(self.overhead_s) if self.overhead_s else None,
        }


@dataclass
class Efficiency:
    """The costs of every task a model answered, task by task, since it was created or `reset`."""

    tasks: dict[str, TaskCosts] = field(default_factory=dict)

    def add(
        self,
        task: str,
        visual_before: Sequence[int],
        visual_kept: Sequence[int],
        prefill_flops: Sequence[int],
        prefill_s: float,
        overhead_s: float | None,
    ) -> None:
        """Count one batch of `task`: per-sample tokens and FLOPs, the batch's prefill and selection time."""
        costs = self.tasks.setdefault(task, TaskCosts())
        costs.visual_before += visual_before
        costs.visual_kept += visual_kept
        costs.prefill_flops += prefill_flops
        costs.prefill_s.append(prefill_s)
        if overhead_s is not None:
            costs.overhead_s.append(overhead_s)

    def reset(self) -> None:
        """Forget every batch (a new run with the same model)."""
        self.tasks.clear()

    def summary(self, run: dict[str, Any]) -> dict[str, Any]:
        """The sidecar's content: the format, what ran (`run`), then each task's `TaskCosts.summary`."""
        return {
            "format": FORMAT,
            **run,
            "tasks": {name: costs.summary() for name, costs in sorted(self.tasks.items())},
        }

    def write(self, path: Path, run: dict[str, Any]) -> None:
        """Write the summary as JSON at `path` (its folder created), replacing the previous one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(self.summary(run), indent=2) + "\n")
        partial.replace(path)
