"""What every ablation bench shares: the loaded model, the timing batch, and the fields of a row.

A bench measures the cells of one run: `Bench` (`tokenprune.lab.runner`) on a VQA dataset's samples,
`LmmsBench` (`tokenprune.lab.lmms_bench`) through lmms-eval's tasks. Both record a cell's identity,
the run's context and the paired timings against the baseline on the timing batch the same way,
from here.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.lab.batches import model_view
from tokenprune.lab.config import AblationConfig
from tokenprune.lab.grid import Cell
from tokenprune.lab.loading import Loaded, load_model
from tokenprune.lab.machine_lock import computing
from tokenprune.lab.report import SAMPLE_IMAGE
from tokenprune.lab.speed import Footprint, PairedSpeed, flags, footprint, paired_generation
from tokenprune.lab.timing import TIMING_METHOD


@dataclass
class BaseBench:
    """The model, the timing batch (on the CPU), the unreduced model's memory on it and the run's
    fingerprint: what a bench needs for the rows' shared fields and the timing columns."""

    config: AblationConfig
    config_file: Path
    loaded: Loaded
    timed: dict[str, Tensor]  # the timing batch's inputs, on the CPU
    baseline_footprint: Footprint  # KV bytes and peak memory of the unreduced model on `timed`
    fingerprint: str  # the run's short fingerprint, in every row

    def failure(self, cell: Cell, error: Exception) -> dict[str, Any]:
        """The row of a cell that raised: its identity and the error, no measurement."""
        return {
            **identity(cell),
            **self.context(),
            "error": f"{type(error).__name__}: {error}",
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def timings(self, reduction: tp.ReductionConfig | None) -> dict[str, Any]:
        """The timing columns of a cell: paired ratios against the baseline, memory, selection time."""
        spec, loaded = self.config.timing, self.loaded
        inputs = on_device(self.timed, loaded)  # one copy on the device for this cell, dropped after it
        adapter = loaded.adapter.name
        speed = paired_generation(
            loaded.model, inputs, reduction, spec.decode_tokens, spec.repeats, spec.warmup, adapter
        )
        cell = self.baseline_footprint
        if reduction is not None:
            cell = footprint(loaded.model, inputs, reduction, spec.decode_tokens, adapter)
        return {
            **timing_fields(speed, spec.decode_tokens),
            "timing_batch_size": len(inputs["input_ids"]),
            **memory_fields(self.baseline_footprint, cell),
        }

    def context(self) -> dict[str, Any]:
        """The fields every row of the run shares: run name, fingerprint, config file, environment."""
        return {
            "run": self.config.name,
            "fingerprint": self.fingerprint,
            "config_file": str(self.config_file),
            "timing": timing_settings(self.config),
            "environment": environment(self.loaded.model),
        }

    def save_sample_image(self, folder: Path) -> None:
        """The first image of the timing batch as the model sees it (the survival maps' background)."""
        image = model_view(self.loaded.processor, self.timed)
        if image is not None:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{SAMPLE_IMAGE}.{os.getpid()}.partial"  # shards may write it at once
            image.save(partial, format="PNG")
            partial.replace(folder / SAMPLE_IMAGE)


def on_device(inputs: dict[str, Tensor], loaded: Loaded) -> dict[str, Tensor]:
    """A copy of CPU inputs on the model's (first) device."""
    return {name: value.to(loaded.device) for name, value in inputs.items()}


def baseline_footprint(loaded: Loaded, timed: dict[str, Tensor], config: AblationConfig) -> Footprint:
    """KV-cache bytes and peak memory of the unreduced model on the timing batch."""
    tokens = config.timing.decode_tokens
    return footprint(loaded.model, on_device(timed, loaded), None, tokens, loaded.adapter.name)


@computing()
def open_model(config: AblationConfig) -> Loaded:
    """The config's model through the lab's one loader, with its prompt and answer length as configured."""
    spec = config.model
    loaded = load_model(
        spec.source,
        dtype=spec.dtype,
        device=spec.device,
        device_map=spec.device_map,
        attn_implementation=spec.attn_implementation,
        adapter=spec.adapter,
    )
    return replace(
        loaded,
        prompt=spec.prompt or loaded.prompt,
        max_new_tokens=config.generation.max_new_tokens or loaded.max_new_tokens,
    )


def timing_fields(speed: PairedSpeed, new_tokens: int) -> dict[str, Any]:
    """Medians of the times, the speed-ups (median of the per-pair ratios, inverted), their spreads, flags.

    Nothing is clamped: a bad measurement keeps its value and is named in `timing_flags`.
    """
    fields: dict[str, Any] = {"timing_repeats": speed.prefill.repeats, "timing_decode_tokens": new_tokens}
    for name, ratio in (("prefill_s", speed.prefill), ("decode_s_per_token", speed.decode)):
        stem = name.split("_")[0]
        fields[name], fields[f"baseline_{name}"] = ratio.variant_s, ratio.baseline_s
        fields[f"{stem}_speedup"] = _finite(ratio.speedup)
        fields[f"{stem}_spread"] = _finite(ratio.spread)
    fields["timing_flags"] = flags(speed, new_tokens)
    return fields


def _finite(value: float) -> float | None:
    """The value, or None when it is infinite or NaN (JSON has neither)."""
    return value if math.isfinite(value) else None


def memory_fields(base: Footprint, cell: Footprint) -> dict[str, Any]:
    """KV-cache bytes and peak memory of the cell and the baseline, and the cell's selection time."""
    return {
        "kv_cache_bytes": cell.kv_cache_bytes,
        "baseline_kv_cache_bytes": base.kv_cache_bytes,
        "kv_cache_bytes_decoded": cell.kv_cache_bytes_decoded,
        "peak_memory_bytes": cell.peak_memory_bytes,
        "baseline_peak_memory_bytes": base.peak_memory_bytes,
        "overhead_s": cell.overhead_s,
    }


def identity(cell: Cell) -> dict[str, Any]:
    """The fields that say which cell a row is."""
    reduction = cell.reduction
    stage = None if reduction is None else reduction.stages[0]
    return {
        "key": cell.key,
        "index": cell.index,
        "label": cell.label,
        "strategy": "baseline" if reduction is None else reduction.strategy,
        "layer": None if stage is None else stage.layer,
        "site": None if stage is None else stage.site,
        "ratio": 0.0 if stage is None else stage.ratio,
        "keep": None if stage is None else stage.keep,
        "params": {} if reduction is None else reduction.params,
        "seed": cell.seed,
        "cell": cell.config(),
    }


def environment(model: nn.Module) -> dict[str, Any]:
    """Library versions and the device a row was measured on."""
    device = next(model.parameters()).device
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    return {
        "tokenprune": tp.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
    }


def timing_settings(config: AblationConfig) -> dict[str, Any]:
    """How a run times its cells (settings and method version): a row timed otherwise is re-measured."""
    return {**config.timing.model_dump(), "method": TIMING_METHOD}
