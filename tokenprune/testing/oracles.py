"""Input builders and independent oracles for the exactness tests.

The mask oracle runs the *unreduced* model and, from each stage's layer on, masks the removed
tokens out as keys with a hand-built 4-D mask: the kept tokens' outputs must equal those of
tokenprune's shortened run. Under the `renumbered` position policy it also gives the layers from
such a stage the rotary tables of the renumbered ids (`renumbered_ids`, one token at a time), and the
layer-0 oracle runs the unreduced model on the shortened inputs (`shortened_inputs`). It shares no
code with tokenprune's mechanics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VIDEO_TOKEN_ID

TEXT_IDS = range(10, 120)


@dataclass
class Prompt:
    """One sample: text chunk lengths around `images` images (len(text) == images + 1)."""

    text: Sequence[int]
    images: int

    def ids(self, tokens_per_image: int | Sequence[int], seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        per_image = (
            [tokens_per_image] * self.images if isinstance(tokens_per_image, int) else list(tokens_per_image)
        )
        out: list[int] = []
        for i, n in enumerate(self.text):
            out += torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (n,), generator=gen).tolist()
            if i < self.images:
                out += [IMAGE_TOKEN_ID] * per_image[i]
        return out


def left_padded(rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask of left-padded rows."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def pixels(n_images: int, size: int = 24, seed: int = 0) -> Tensor:
    return torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))


def llava_inputs(prompts: Sequence[Prompt], tokens_per_image: int = 36, seed: int = 0) -> dict[str, Tensor]:
    """A left-padded LLaVA batch: prompts with their images, pixel values in batch order."""
    rows = [p.ids(tokens_per_image, seed + i) for i, p in enumerate(prompts)]
    ids, mask = left_padded(rows)
    n_images = sum(p.images for p in prompts)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if n_images:
        inputs["pixel_values"] = pixels(n_images, seed=seed)
    return inputs


def removed_positions(trace, valid: Tensor) -> list[tuple[int, Tensor]]:
    """(layer, removed [B, N] bool) per stage: real tokens not kept from that layer on."""
    out = []
    for event in trace:
        kept = torch.zeros_like(valid)
        for b, row in enumerate(event.kept):
            kept[b, row[row >= 0]] = True
        out.append((event.layer, valid & ~kept))
    return out


def oracle_masks(model, stages: list[tuple[int, Tensor]], valid: Tensor, extra: int = 0):
    """Pre-hooks giving layers >= each stage a 4-D mask hiding that stage's removed tokens as keys.

    `extra` appended tokens (generated so far) are real and never removed. Returns the hook handles.
    """
    layers = model.model.language_model.layers
    config = model.model.language_model.config
    batch, length = valid.shape
    total = length + extra
    key_ok = torch.cat([valid, torch.ones(batch, extra, dtype=torch.bool)], dim=1)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    handles = []
    for layer_index, layer in enumerate(layers):
        removed = torch.zeros(batch, total, dtype=torch.bool)
        for stage_layer, stage_removed in stages:
            if layer_index >= stage_layer:
                removed[:, :length] |= stage_removed
        allowed = causal[None] & (key_ok & ~removed)[:, None, :]
        allowed |= torch.eye(total, dtype=torch.bool)[None]  # fully masked rows (padding) stay finite
        if config._attn_implementation == "eager":
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        else:
            mask = allowed[:, None]

        def hook(module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask}

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def generation_positions(mask: Tensor) -> Tensor:
    """Position ids as `generate` derives them from a left-padded attention mask."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def oracle_logits(
    model, inputs: dict[str, Tensor], trace, appended: int = 0, config: tp.ReductionConfig | None = None
) -> Tensor:
    """Logits of the unreduced model with the trace's removed tokens masked from their layer on.

    The last `appended` tokens came after the reduced prompt (a continuation): never removed.
    `config` gives each stage's position policy (None: `original` everywhere).
    """
    valid = inputs["attention_mask"][:, : inputs["attention_mask"].shape[1] - appended].bool()
    handles = oracle_masks(model, removed_positions(trace, valid), valid, extra=appended)
    handles += renumbering_hooks(model, inputs, trace, config, appended)
    try:
        return model(
            **inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False
        ).logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def oracle_greedy(
    model, inputs: dict[str, Tensor], trace, steps: int, config: tp.ReductionConfig | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Greedy continuation without a cache under the mask oracle: (tokens [B, steps], logits per step).

    `config` gives each stage's position policy (None: `original` everywhere).
    """
    valid = inputs["attention_mask"].bool()
    stages = removed_positions(trace, valid)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tokens, logits = [], []
    for step in range(steps):
        handles = oracle_masks(model, stages, valid, extra=step)
        grown = {**inputs, "input_ids": ids, "attention_mask": mask}
        handles += renumbering_hooks(model, grown, trace, config, appended=step)
        try:
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=generation_positions(mask),
                use_cache=False,
                **extra,
            )
        finally:
            for h in handles:
                h.remove()
        last = out.logits[:, -1].clone()
        last[:, list(model.generation_config.suppress_tokens or [])] = float("-inf")
        nxt = last.argmax(-1)
        tokens.append(nxt)
        logits.append(last)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1), logits


def assert_same_greedy(got: Tensor, expected: Tensor, logits: list[Tensor], tie: float = 1e-4) -> None:
    """Greedy tokens equal, except after a genuine near-tie of the oracle's top two logits."""
    for b in range(got.shape[0]):
        for step in range(expected.shape[1]):
            if got[b, step] == expected[b, step]:
                continue
            top2 = logits[step][b].topk(2).values
            assert float(top2[0] - top2[1]) < tie, (
                f"sample {b} step {step}: {got[b].tolist()} != {expected[b].tolist()}"
            )
            break


def greedy(model, inputs: dict[str, Tensor], steps: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy tokens [B, steps] and each step's logits, from `generate` with the KV cache.

    End-of-sequence is not special (`eos_token_id=None`), as in the oracle's greedy loop.
    """
    out = greedy_output(model, inputs, steps)
    return out.sequences[:, -steps:], list(out.logits)


def greedy_output(model, inputs: dict[str, Tensor], steps: int, **kwargs: Any) -> Any:
    """`generate`'s dict output of a greedy run of `steps` tokens with each step's logits (end-of-sequence
    not special); `kwargs` go to `generate` (a cache to continue, say)."""
    return model.generate(
        **inputs,
        max_new_tokens=steps,
        eos_token_id=None,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


@torch.no_grad()
def recomputed_greedy(model, inputs: dict[str, Tensor], steps: int) -> Tensor:
    """Greedy tokens [B, steps] recomputing the whole sequence at every step, without a cache.

    Run under an attachment, each step reduces the full sequence again: the oracle of decode steps
    on a reduced cache for strategies whose choice does not depend on the tokens generated later.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        step = {**inputs, "input_ids": ids, "attention_mask": mask}
        last = model(**step, position_ids=generation_positions(mask), use_cache=False).logits[:, -1]
        last[:, list(model.generation_config.suppress_tokens or [])] = float("-inf")
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, -steps:]


def assert_kept_logits_match(logits: Tensor, expected: Tensor, kept: Tensor, tol: float = 1e-4) -> None:
    """The logits at every kept position (`kept` [B, L'], -1 filler) match within `tol` (max abs diff)."""
    for b, row in enumerate(kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= tol


def tower_mask_hooks(layers, event) -> list:
    """Vision-tower layers after `event`'s hide the tokens it removed, as keys (a full-length run)."""
    n_items, total = event.groups.shape
    kept = torch.zeros(n_items, total, dtype=torch.bool)
    for item, row in enumerate(event.kept):
        kept[item, row] = True
    hidden = torch.finfo(torch.float32).min
    mask = torch.zeros(n_items, 1, 1, total).masked_fill(~kept[:, None, None, :], hidden)

    def hook(module, args):
        return (args[0], mask, *args[2:])

    return [layer.register_forward_pre_hook(hook) for layer in layers[event.layer + 1 :]]


@contextmanager
def hooked(handles: list) -> Iterator[None]:
    """Run the body with these oracle hooks in place, and remove them afterwards whatever happens."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def class_token_view(
    batch: int, grid: tuple[int, int], budget: int, signals: dict[str, Callable[..., Tensor]]
) -> tp.TokenView:
    """A vision-site view of `batch` images: the class token at slot 0 (protected), then the
    rows x cols patch grid row-major, with the given lazy signals (as a vision site builds it)."""
    rows, cols = grid
    length = 1 + rows * cols
    candidates = torch.ones(batch, length, dtype=torch.bool)
    candidates[:, 0] = False
    patch = torch.arange(length - 1)
    coords = torch.full((batch, length, 3), -1)
    coords[:, 1:] = torch.stack([torch.zeros_like(patch), patch // cols, patch % cols], dim=-1)
    extent = torch.zeros(batch, length, 3, dtype=torch.long)
    extent[:, 1:] = torch.tensor([1, rows, cols])
    return tp.TokenView(
        hidden=torch.randn(batch, length, 4),
        candidates=candidates,
        valid=torch.ones_like(candidates),
        segment=torch.where(candidates, 0, -1),
        coords=coords,
        extent=extent,
        positions=torch.arange(length).expand(batch, -1),
        budget=torch.full((batch,), budget),
        layer=22,
        signals=tp.Signals(signals),
        frame=torch.where(candidates, 0, -1),
        site="vision",
    )


# -- the `renumbered` position policy ---------------------------------------------------------------


def stage_policies(config: tp.ReductionConfig | None, trace) -> list[str]:
    """The position policy of each language-model event of `trace` (None: `original` for all); the
    hand-off of `site: vision` stages (layer 0) follows the last vision stage's."""
    events = [event for event in trace if event.site == "language"]
    if config is None:
        return ["original"] * len(events)
    stages = {stage.layer: stage for stage in config.stages if stage.site == "language"}
    vision = [stage for stage in config.stages if stage.site == "vision"]
    return [config.position_policy(stages.get(event.layer) or vision[-1]) for event in events]


def placeholder_items(input_ids: Tensor) -> Tensor:
    """[B, N] the visual item of each token (a run of consecutive placeholders), -1 for text."""
    visual = (input_ids == IMAGE_TOKEN_ID) | (input_ids == VIDEO_TOKEN_ID)
    begins = visual & ~torch.cat([torch.zeros_like(visual[:, :1]), visual[:, :-1]], dim=1)
    return torch.where(visual, begins.long().cumsum(1) - 1, -1)


def renumbered_ids(own: Tensor, items: Tensor, real: Tensor, kept: Tensor) -> Tensor:
    """`own` [R, B, N] (the model's ids) with the kept real tokens (`kept` [B, N]) renumbered, token by token.

    1-D ids (R = 1): the sample's first id, then + 1 per token. M-RoPE (R > 1): a text token takes
    `following` in every row; an item's kept tokens take the `following` met at the item + their offset
    from the item's smallest own id, and `following` becomes that + their largest height or width
    offset + 1. The other tokens keep their own ids.
    """
    new = own.clone()
    grid = own.shape[0] > 1
    for b in range(own.shape[1]):
        ids = own[:, b].T.tolist()  # [N][R]
        out = [list(row) for row in ids]
        sample_items, sample_real, sample_kept = items[b].tolist(), real[b].tolist(), kept[b].tolist()
        origin: dict[int, int] = {}
        for j, item in enumerate(sample_items):
            if item >= 0 and sample_real[j]:
                origin[item] = min(origin.get(item, min(ids[j])), min(ids[j]))
        following = min(min(ids[j]) for j in range(len(ids)) if sample_real[j])
        previous, base = -1, 0
        for j, item in enumerate(sample_items):
            if not (sample_real[j] and sample_kept[j]):
                continue
            item = item if grid else -1
            if item < 0:
                out[j] = [following] * len(out[j])
                following += 1
            else:
                base = following if item != previous else base
                offset = [value - origin[item] for value in ids[j]]
                out[j] = [base + value for value in offset]
                following = max(following, base + max(offset[1:]) + 1)
            previous = item
        new[:, b] = torch.tensor(out, dtype=own.dtype).T
    return new


def _own_rows(own: Tensor, batch: int) -> Tensor:
    rows = own if own.ndim == 3 else own[None]
    return rows.expand(rows.shape[0], batch, rows.shape[-1])


def renumbering_hooks(
    model, inputs: dict[str, Tensor], trace, config: tp.ReductionConfig | None, appended: int = 0
) -> list:
    """Pre-hooks giving each decoder layer from a `renumbered` stage on (until the next one) the rotary
    tables of `renumbered_ids`, computed by the model's own rotary module from the ids it asked for.

    The last `appended` tokens of `inputs` came after the prompt: kept, numbered on from it.
    """
    language = model.model.language_model
    mask = inputs["attention_mask"].bool()
    valid = mask[:, : mask.shape[1] - appended]
    events = [event for event in trace if event.site == "language"]
    removed = removed_positions(events, valid)
    renumbering = [
        (layer, torch.cat([valid & ~gone, mask[:, valid.shape[1] :]], dim=1))
        for (layer, gone), policy in zip(removed, stage_policies(config, trace), strict=True)
        if policy == "renumbered"
    ]
    if not renumbering:
        return []
    items, seen = placeholder_items(inputs["input_ids"]), {}

    def capture(module, args, kwargs):
        seen.clear()
        seen["own"] = kwargs["position_ids"] if "position_ids" in kwargs else args[1]

    handles = [language.rotary_emb.register_forward_pre_hook(capture, with_kwargs=True)]
    for index, layer in enumerate(language.layers):
        active = [kept for at, kept in renumbering if at <= index]
        if not active:
            continue
        stage = len(active)

        def hook(module, args, kwargs, kept=active[-1], stage=stage):
            own = seen["own"]
            if stage not in seen:
                seen[stage] = renumbered_ids(_own_rows(own, mask.shape[0]), items, mask, kept)
            ids = seen[stage] if own.ndim == 3 else seen[stage][0]
            hidden = args[0] if args else kwargs["hidden_states"]
            return args, {**kwargs, "position_embeddings": language.rotary_emb(hidden, ids)}

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@torch.no_grad()
def shortened_inputs(
    model, inputs: dict[str, Tensor], kept: Tensor, position_ids: Tensor | None = None
) -> dict[str, Tensor]:
    """The layer-0 oracle's inputs: the unreduced model's language-model input with the removed tokens
    deleted (`kept` [B, L], left-filled with -1; features in place), and the ids `renumbered_ids` gives.

    Runs the unreduced model once (with `position_ids`, if given) to read its `inputs_embeds` and the
    ids it asks its rotary module for.
    """
    language, seen = model.model.language_model, {}

    def embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    def positions(module, args, kwargs):
        seen["own"] = kwargs["position_ids"] if "position_ids" in kwargs else args[1]

    with hooked(
        [
            language.register_forward_pre_hook(embeds, with_kwargs=True),
            language.rotary_emb.register_forward_pre_hook(positions, with_kwargs=True),
        ]
    ):
        model(**inputs, position_ids=position_ids, use_cache=False)
    real = inputs["attention_mask"].bool()
    own = _own_rows(seen["own"], kept.shape[0])
    kept_mask = torch.zeros_like(real)
    for b, row in enumerate(kept):
        kept_mask[b, row[row >= 0]] = True
    ids = renumbered_ids(own, placeholder_items(inputs["input_ids"]), real, kept_mask)
    slots = kept.clamp(min=0)
    short_ids = ids.gather(2, slots[None].expand(ids.shape[0], -1, -1)).masked_fill(kept[None] < 0, 0)
    short = seen["embeds"].gather(1, slots[..., None].expand(-1, -1, seen["embeds"].shape[-1]))
    return {
        "inputs_embeds": short.masked_fill(kept[..., None] < 0, 0.0),
        "attention_mask": (kept >= 0).long(),
        "position_ids": short_ids if seen["own"].ndim == 3 else short_ids[0],
    }


@torch.no_grad()
def shortened_greedy(
    model, short: dict[str, Tensor], steps: int, banned: Sequence[int] = ()
) -> tuple[Tensor, list[Tensor]]:
    """Greedy tokens [B, steps] of the unreduced model on `shortened_inputs` without a cache, and each
    step's logits: a new token takes the largest id so far + 1 in every row (`generation_config.
    suppress_tokens` and `banned` never chosen)."""
    embed = model.get_input_embeddings()
    suppressed = [*(model.generation_config.suppress_tokens or []), *banned]
    grown, tokens, logits = dict(short), [], []
    for _ in range(steps):
        last = model(**grown, use_cache=False).logits[:, -1].clone()
        last[:, suppressed] = float("-inf")
        nxt = last.argmax(-1)
        tokens.append(nxt)
        logits.append(last)
        ids = grown["position_ids"]
        rows = ids if ids.ndim == 3 else ids[None]
        following = (rows.amax(dim=(0, 2)) + 1)[None, :, None].expand(rows.shape[0], -1, 1)
        rows = torch.cat([rows, following], dim=-1)
        grown = {
            "inputs_embeds": torch.cat([grown["inputs_embeds"], embed(nxt)[:, None]], dim=1),
            "attention_mask": torch.cat([grown["attention_mask"], torch.ones_like(nxt)[:, None]], dim=1),
            "position_ids": rows if ids.ndim == 3 else rows[0],
        }
    return torch.stack(tokens, dim=1), logits
