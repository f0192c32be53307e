"""The public oracles of the conformance suite, generic over model families (float32, unreduced models).

Mask oracle: the *unreduced* model whose decoder layers get a hand-built 4-D mask: the family's
attention pattern (causal over real tokens unless the family says otherwise), minus the keys each
language-model stage removed, from that stage's layer on. A pruned run's logits at the kept
positions must equal the oracle's. It shares no code with tokenprune's mechanics.

Merge oracle: the unreduced model where, at the merge stage's layer K, each surviving token's hidden
state becomes the plain mean of its group (the tokens the trace's `groups` assign to it) and, from
K on, merged-away tokens are hidden as keys and, with proportional attention, log(group size) is
added to every query's logit of each key. A merging run's kept logits must equal it.

Positions: families whose model derives its own (3-D) positions get none; the others get the
positions `generate` derives from the left-padded attention mask, so prefill and decode agree.
Given the run's `config`, the layers from a stage of the `renumbered` position policy on get the
rotary tables of the renumbered ids (`oracles.renumbering_hooks`); without it every stage keeps the
original positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenprune.config import ReductionConfig
from tokenprune.core.selection import ReductionEvent
from tokenprune.registry import adapter_for
from tokenprune.testing.family import Family
from tokenprune.testing.oracles import generation_positions, hooked, renumbering_hooks


def forward(family: Family, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Logits of one cache-free forward, with the positions `generate` would use."""
    mask = inputs["attention_mask"]
    positions = {} if family.model_positions else {"position_ids": generation_positions(mask)}
    return model(**inputs, **positions, use_cache=False).logits


def attention_pattern(family: Family, model: nn.Module, inputs: dict[str, Tensor], layer: int) -> Tensor:
    """bool [B, N, N]: the keys each query may see in decoder layer `layer` of the unreduced model."""
    if family.attention is not None:
        return family.attention(model, inputs, layer)
    valid = inputs["attention_mask"].bool()
    length = valid.shape[1]
    return torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]


def stage_removals(trace: Sequence[ReductionEvent], valid: Tensor) -> list[tuple[int, Tensor]]:
    """(layer, removed bool [B, N]) of each language-model stage: real prompt tokens it did not keep."""
    out = []
    for event in trace:
        if event.site != "language":
            continue
        kept = torch.zeros_like(valid)
        for b, row in enumerate(event.kept):
            kept[b, row[row >= 0]] = True
        out.append((event.layer, valid & ~kept))
    return out


def _layer_mask(allowed: Tensor, key_bias: Tensor | None = None) -> Tensor:
    """[B, 1, N, N] additive float mask of `allowed` keys (each query sees itself: padding stays finite)."""
    allowed = allowed | torch.eye(allowed.shape[-1], dtype=torch.bool)[None]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    if key_bias is not None:
        mask = mask + key_bias[:, None, :]
    return mask[:, None]


def _masking_hook(mask: Tensor):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "attention_mask": mask}

    return hook


def _decoder_layers(family: Family, model: nn.Module) -> Sequence[nn.Module]:
    return adapter_for(model, family.adapter).decoder_layers()


def mask_oracle_hooks(
    family: Family,
    model: nn.Module,
    inputs: dict[str, Tensor],
    trace: Sequence[ReductionEvent],
    prompt: int,
    config: ReductionConfig | None = None,
) -> list:
    """Pre-hooks giving every decoder layer the mask oracle's 4-D mask (and renumbered positions where
    `config` asks for them); returns the handles.

    `prompt`: length of the reduced prompt; tokens after it (generated since) are never removed.
    """
    valid = inputs["attention_mask"].bool()
    handles = []
    for index, layer in enumerate(_decoder_layers(family, model)):
        removed = torch.zeros_like(valid)
        for stage_layer, stage_removed in stage_removals(trace, valid[:, :prompt]):
            if index >= stage_layer:
                removed[:, :prompt] |= stage_removed
        allowed = attention_pattern(family, model, inputs, index) & ~removed[:, None, :]
        handles.append(layer.register_forward_pre_hook(_masking_hook(_layer_mask(allowed)), with_kwargs=True))
    return handles + renumbering_hooks(model, inputs, trace, config, appended=valid.shape[1] - prompt)


@torch.no_grad()
def mask_oracle_logits(
    family: Family,
    model: nn.Module,
    inputs: dict[str, Tensor],
    trace: Sequence[ReductionEvent],
    config: ReductionConfig | None = None,
) -> Tensor:
    """Prefill logits of the unreduced model with the trace's removed tokens masked from their layer on."""
    with hooked(mask_oracle_hooks(family, model, inputs, trace, inputs["input_ids"].shape[1], config)):
        return forward(family, model, inputs)


@torch.no_grad()
def merge_oracle_logits(
    family: Family,
    model: nn.Module,
    inputs: dict[str, Tensor],
    event: ReductionEvent,
    proportional: bool,
    config: ReductionConfig | None = None,
) -> Tensor:
    """Logits of the unreduced model reproducing one language-model merge stage by hand.

    Tokens appended after the reduced prompt (a continuation) are their own groups: never merged.
    """
    valid = inputs["attention_mask"].bool()
    positions = torch.arange(valid.shape[1])
    prompt = event.groups.shape[1]
    groups = torch.cat([event.groups, positions[prompt:].expand(len(valid), -1)], dim=1)
    members = groups[:, None, :] == positions[None, :, None]  # [B, representative, N]
    size = members.sum(-1).float()
    survivor = valid & (groups == positions)
    bias = size.clamp(min=1).log() if proportional else None

    def merge(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = kwargs["hidden_states"] if not args else args[0]
        averaged = (members.float() @ hidden) / size.clamp(min=1)[..., None]
        hidden = torch.where(survivor[..., None], averaged, hidden)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handles = []
    for index, layer in enumerate(_decoder_layers(family, model)):
        pattern = attention_pattern(family, model, inputs, index)
        if index < event.layer:
            mask = _layer_mask(pattern)
        else:
            mask = _layer_mask(pattern & survivor[:, None, :], bias)
        handles.append(layer.register_forward_pre_hook(_masking_hook(mask), with_kwargs=True))
        if index == event.layer:
            handles.append(layer.register_forward_pre_hook(merge, with_kwargs=True))
    appended = valid.shape[1] - prompt
    with hooked(handles + renumbering_hooks(model, inputs, [event], config, appended=appended)):
        return forward(family, model, inputs)


def extended(inputs: dict[str, Tensor], token: Tensor) -> dict[str, Tensor]:
    """The inputs with one more token per sample ([B, 1]): a real token of no visual item."""
    grown = dict(inputs)
    grown["input_ids"] = torch.cat([inputs["input_ids"], token], dim=1)
    grown["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    for key in inputs:
        if key.endswith("token_type_ids"):  # Qwen's mm_token_type_ids, Gemma 3's token_type_ids
            grown[key] = torch.cat([inputs[key], torch.zeros_like(token)], dim=1)
    return grown


def _suppressed(model: nn.Module, logits: Tensor) -> Tensor:
    """Last-position logits with the tokens `generate` suppresses (image placeholders) banned."""
    logits = logits.clone()
    logits[:, list(model.generation_config.suppress_tokens or [])] = float("-inf")
    return logits


@torch.no_grad()
def merge_oracle_greedy(
    family: Family,
    model: nn.Module,
    inputs: dict[str, Tensor],
    event: ReductionEvent,
    proportional: bool,
    steps: int,
    config: ReductionConfig | None = None,
) -> Tensor:
    """Greedy tokens [B, steps] without a cache under the merge oracle of the prompt's one merge stage.

    The oracle of decode steps on a merged cache, also for strategies whose choice reads the text (the
    prompt's merge is replayed, never made again on the grown sequence).
    """
    grown = inputs
    for _ in range(steps):
        logits = merge_oracle_logits(family, model, grown, event, proportional, config)
        grown = extended(grown, _suppressed(model, logits[:, -1]).argmax(-1, keepdim=True))
    return grown["input_ids"][:, -steps:]


@torch.no_grad()
def mask_oracle_greedy(
    family: Family,
    model: nn.Module,
    inputs: dict[str, Tensor],
    trace: Sequence[ReductionEvent],
    steps: int,
    config: ReductionConfig | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Greedy continuation without a cache under the mask oracle: (tokens [B, steps], logits per step)."""
    prompt = inputs["input_ids"].shape[1]
    grown, tokens, logits = inputs, [], []
    for _ in range(steps):
        with hooked(mask_oracle_hooks(family, model, grown, trace, prompt, config)):
            last = _suppressed(model, forward(family, model, grown)[:, -1])
        tokens.append(last.argmax(-1))
        logits.append(last)
        grown = extended(grown, tokens[-1][:, None])
    return torch.stack(tokens, dim=1), logits


@torch.no_grad()
def recomputed_greedy(family: Family, model: nn.Module, inputs: dict[str, Tensor], steps: int) -> Tensor:
    """Greedy tokens [B, steps] recomputing the whole sequence at every step, without a cache.

    Under an attachment each step reduces the full sequence again: the oracle of decode steps on a
    reduced cache for strategies whose choice does not depend on the tokens generated later.
    """
    grown = inputs
    for _ in range(steps):
        token = _suppressed(model, forward(family, model, grown)[:, -1]).argmax(-1, keepdim=True)
        grown = extended(grown, token)
    return grown["input_ids"][:, -steps:]
