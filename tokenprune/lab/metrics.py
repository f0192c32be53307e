"""What a cell measures on every sample: its answers, their accuracy, its fidelity to the unreduced
model, its prefill FLOPs, the visual tokens it kept, and where the first image's tokens ended.

Accuracy: the greedy answer against the sample's answers after `normalize_answer`: exact match, and
contains-match (an answer appears in it as whole words). Fidelity against the unreduced model on the
same inputs: first-token top-1 agreement, KL of the first-token distribution (unreduced || reduced),
exact match of the greedy continuation. Per sample, beside the answer: the first-step log-probability
of the reference answer's first token (`tokenprune.lab.batches.answer_token`), how sure the cell was
of the right start.

Memory: one batch at a time is on the device; of a generation a cell keeps per-sample numbers only.
The unreduced run alone keeps its first-token log-probabilities ([N, V] float32, on the CPU), the
one thing every cell's KL needs.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.builtin.toyvqa import normalize_answer
from tokenprune.flops import tower_flops, trace_flops
from tokenprune.lab.batches import Batch
from tokenprune.lab.loading import Loaded, attached
from tokenprune.lab.machine_lock import computing


@dataclass
class Outputs:
    """What the model produced on every sample under one cell (per-sample lists, in dataset order)."""

    first_tokens: list[int]  # the greedy first token
    first_token_kl: list[float]  # KL(unreduced || this cell) of the first-token distribution
    continuations: list[list[int]]
    predictions: list[str]
    flops: list[int]  # decoder prefill FLOPs
    tower_flops: list[int] | None  # vision tower FLOPs of the sample's items; None: not counted
    visual_before: list[int]
    visual_after: list[int]
    survival: dict[str, Any] | None = None
    answer_logprobs: list[float | None] = field(default_factory=list)  # the reference answer's first token
    logprobs: Tensor | None = field(default=None, repr=False)  # [N, V] on the CPU: the unreduced run only


@torch.no_grad()
def evaluate(
    loaded: Loaded,
    batches: Sequence[Batch],
    reduction: tp.ReductionConfig | None,
    reference: Tensor | None = None,
) -> Outputs:
    """Greedy answers to every batch with `reduction` attached, and what each sample cost.

    Without `reference` (the unreduced run) the outputs keep their first-token log-probabilities;
    with it, [N, V] log-probabilities of the unreduced run, each batch's KL against it is taken at
    once and its log-probabilities dropped.
    """
    parts: list[Outputs] = []
    start = 0
    for number, batch in enumerate(batches):
        first_reduced = number == 0 and reduction is not None
        end = start + len(batch.tokens)
        part = _batch_outputs(loaded, batch, reduction, survival=first_reduced)
        if reference is not None:
            part.first_token_kl = first_token_kl(part.logprobs, reference[start:end])
            part.logprobs = None
        parts.append(part)
        start = end
    return _concat(parts)


@computing()  # waits while another process times, so its timing is not spoiled
def _batch_outputs(
    loaded: Loaded, batch: Batch, reduction: tp.ReductionConfig | None, survival: bool
) -> Outputs:
    """One batch's generation with `reduction` attached, reduced to per-sample numbers and its logprobs."""
    inputs = batch.on(loaded.device)
    with attached(loaded.model, reduction, loaded.adapter.name) as handle:
        out = loaded.model.generate(
            **inputs,
            max_new_tokens=loaded.max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        trace = [] if handle is None else handle.trace
    language = [event for event in trace if event.site == "language"]  # per sample; vision events count items
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
    new = out.sequences[:, inputs["input_ids"].shape[1] :].cpu()
    del out  # the logits of every step and the device tensors go now, not at the next batch
    n_visual = [] if language else visual_counts(loaded.adapter, inputs)
    return Outputs(
        first_tokens=logprobs.argmax(dim=-1).tolist(),
        first_token_kl=[0.0] * len(batch.tokens),
        continuations=[_until_end(row, _end_ids(loaded.model)) for row in new.tolist()],
        predictions=loaded.processor.batch_decode(new, skip_special_tokens=True),
        flops=trace_flops(loaded.adapter.text_config(), trace, batch.tokens),
        tower_flops=sample_tower_flops(loaded, inputs, trace),
        visual_before=language[0].visual_before if language else n_visual,
        visual_after=language[-1].visual_after if language else n_visual,
        survival=survival_map(loaded.adapter, inputs, trace) if survival else None,
        answer_logprobs=answer_logprobs(logprobs, batch.answer_tokens),
        logprobs=logprobs,
    )


def answer_logprobs(logprobs: Tensor, tokens: Sequence[int | None]) -> list[float | None]:
    """Per sample, the first-step log-probability of its reference-answer token ([n, V] log-probs).

    None where the sample has no such token or the token is outside the model's vocabulary.
    """
    vocabulary = logprobs.shape[-1]
    return [
        None if token is None or token >= vocabulary else logprobs[row, token].item()
        for row, token in enumerate(tokens)
    ]


def sample_tower_flops(loaded: Loaded, inputs: dict[str, Tensor], trace: list) -> list[int] | None:
    """Per sample, the FLOPs of the vision tower on the sample's items (images, frames), as reduced.

    `tokenprune.flops.tower_flops` on the trace's vision-site events. None when the adapter exposes
    no vision tower or several (Video-LLaVA's image and video towers), or the model no vision config.
    """
    towers = loaded.adapter.vision_towers()
    vision_config = getattr(loaded.model.config, "vision_config", None)
    if len(towers) != 1 or vision_config is None:
        return None
    tower = towers[0]
    items = ((inputs["input_ids"] == tower.placeholder_id).sum(dim=1) // tower.tokens_per_item).tolist()
    per_item = tower_flops(
        vision_config, trace, [tower.grid[0] * tower.grid[1] + tower.prefix_tokens] * sum(items)
    )
    starts = [sum(items[:i]) for i in range(len(items))]
    return [sum(per_item[start : start + n]) for start, n in zip(starts, items, strict=True)]


def first_token_kl(logprobs: Tensor, reference: Tensor) -> list[float]:
    """Per sample, KL(reference || cell) = sum_v p_ref (log p_ref - log p_cell), from [n, V] log-probs."""
    kl = torch.nn.functional.kl_div(logprobs, reference, log_target=True, reduction="none")
    return kl.sum(dim=-1).tolist()


def visual_counts(adapter: tp.Adapter, inputs: dict[str, Tensor]) -> list[int]:
    """Visual tokens per sample as the adapter lays them out (the candidates a reduction sees).

    Whatever the placeholder ids (images, videos) and whichever tokens are not candidates (LLaVA-NeXT's
    row newlines), the unreduced count is the one a reduced cell's trace starts from.
    """
    layout = adapter.visual_layout(inputs)
    if layout is None:
        return [0] * inputs["input_ids"].shape[0]
    return layout.visual.sum(dim=1).tolist()


def _end_ids(model: nn.Module) -> set[int]:
    """The tokens that end an answer: end of sequence and padding."""
    config = model.generation_config
    ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    return {i for i in [*ids, config.pad_token_id] if i is not None}


def _until_end(tokens: list[int], end: set[int]) -> list[int]:
    """The tokens before the first end token."""
    for i, token in enumerate(tokens):
        if token in end:
            return tokens[:i]
    return tokens


def _concat(parts: list[Outputs]) -> Outputs:
    """The batches' outputs as one, in dataset order (the survival map of the first batch)."""
    logprobs = [p.logprobs for p in parts if p.logprobs is not None]
    return Outputs(
        first_tokens=[x for p in parts for x in p.first_tokens],
        first_token_kl=[x for p in parts for x in p.first_token_kl],
        continuations=[c for p in parts for c in p.continuations],
        predictions=[x for p in parts for x in p.predictions],
        flops=[x for p in parts for x in p.flops],
        tower_flops=None if parts[0].tower_flops is None else [x for p in parts for x in p.tower_flops or []],
        visual_before=[x for p in parts for x in p.visual_before],
        visual_after=[x for p in parts for x in p.visual_after],
        survival=parts[0].survival,
        answer_logprobs=[x for p in parts for x in p.answer_logprobs],
        logprobs=torch.cat(logprobs) if len(logprobs) == len(parts) else None,
    )


def survival_map(adapter: tp.Adapter, inputs: dict[str, Tensor], trace: list) -> dict[str, Any] | None:
    """The first sample's first image (or video, frames side by side): per cell, where its token ended.

    The first grid of the sample (a segment more than one cell wide or high: a video's class tokens
    are a 1 x 1 grid each) as one strip `grid = [H, frames * W]`, frame t in columns t*W to t*W + W - 1.
    `state[row * frames * W + t * W + col]`: -1 when pruned; else the strip index of the token it
    survives in (itself when kept alone; a merge group's surviving token when the event has `groups`).
    """
    layout = adapter.visual_layout(inputs)
    if layout is None or not trace:
        return None
    positions = (layout.segment[0] == _first_grid(layout)).nonzero().flatten().tolist()
    if not positions:
        return None
    frames, height, width = layout.extent[0, positions[0]].tolist()
    coords = layout.coords[0, positions].tolist()
    cell_of = {
        p: (row * frames + t) * width + col for p, (t, row, col) in zip(positions, coords, strict=True)
    }
    event = trace[-1]
    if event.groups is not None:
        target = dict(zip(positions, event.groups[0, positions].tolist(), strict=True))
    else:
        kept = set(event.kept[0].tolist())
        target = {p: p if p in kept else -1 for p in positions}
    state = [-1] * (height * frames * width)
    for p, cell in cell_of.items():
        state[cell] = cell_of.get(target[p], -1)
    return {"grid": [height, frames * width], "state": state}


def _first_grid(layout: tp.VisualLayout) -> int:
    """The first segment of the first sample that is more than one cell per frame (else segment 0)."""
    visual = layout.visual[0]
    for segment in layout.segment[0][visual].unique().tolist():
        at = (layout.segment[0] == segment).nonzero()[0, 0]
        if layout.extent[0, at, 1:].prod() > 1:
            return segment
    return 0


def accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and contains-match (an answer's words appear together) after `normalize_answer`."""
    contains = 0
    for prediction, accepted in zip(predictions, answers, strict=True):
        said = normalize_answer(prediction)
        contains += any(f" {w} " in f" {said} " for w in {normalize_answer(a) for a in accepted} if w)
    exact = exact_matches(predictions, answers)
    return {"accuracy_exact": sum(exact) / len(answers), "accuracy_contains": contains / len(answers)}


def exact_matches(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> list[bool]:
    """Per sample, whether the prediction equals an accepted answer after `normalize_answer`.

    What `accuracy_exact` counts, sample by sample (the per-sample `correct` of a row).
    """
    return [
        normalize_answer(prediction) in {normalize_answer(a) for a in accepted}
        for prediction, accepted in zip(predictions, answers, strict=True)
    ]


def fidelity(outputs: Outputs, reference: Outputs) -> dict[str, float]:
    """Agreement with the unreduced model: first-token top-1, first-token KL(ref || cell), continuation."""
    top1 = [a == b for a, b in zip(outputs.first_tokens, reference.first_tokens, strict=True)]
    same = [a == b for a, b in zip(outputs.continuations, reference.continuations, strict=True)]
    return {
        "top1_agreement": sum(top1) / len(top1),
        "first_token_kl": statistics.mean(outputs.first_token_kl),
        "continuation_match": sum(same) / len(same),
    }


def costs(outputs: Outputs, reference: Outputs) -> dict[str, float | None]:
    """Visual tokens before and after, decoder prefill FLOPs against the unreduced run's, and the
    vision tower's FLOPs in their own columns (sample means)."""
    flops, base = statistics.mean(outputs.flops), statistics.mean(reference.flops)
    tower = None if outputs.tower_flops is None else statistics.mean(outputs.tower_flops)
    base_tower = None if reference.tower_flops is None else statistics.mean(reference.tower_flops)
    return {
        "visual_tokens_before": statistics.mean(outputs.visual_before),
        "visual_tokens_after": statistics.mean(outputs.visual_after),
        "prefill_flops": flops,
        "baseline_prefill_flops": base,
        "flops_ratio": flops / base,
        "tower_flops": tower,
        "baseline_tower_flops": base_tower,
    }
