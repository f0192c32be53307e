"""Qwen2-VL / Qwen2.5-VL batches built without a processor; the mask oracle on the model's 3-D positions.

The oracle reuses `oracles.oracle_masks` (a 4-D mask hiding removed tokens as keys from their
layer on) but never passes position ids: the model computes its M-RoPE positions itself (under the
`renumbered` policy `oracles.renumbering_hooks` renumbers them from a stage on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import tokenprune as tp
from tokenprune.testing.models import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
)
from tokenprune.testing.oracles import (
    TEXT_IDS,
    left_padded,
    oracle_masks,
    removed_positions,
    renumbering_hooks,
)

MERGE = 2


@dataclass(frozen=True)
class Item:
    """One image (t = 1) or video: its patch grid (t, h, w) before the 2 x 2 merger (h, w even)."""

    grid: tuple[int, int, int]
    video: bool = False

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w // MERGE**2

    @property
    def merged(self) -> tuple[int, int, int]:
        t, h, w = self.grid
        return t, h // MERGE, w // MERGE


@dataclass(frozen=True)
class QwenPrompt:
    """One sample: text chunk lengths around its items (len(text) == len(items) + 1)."""

    text: Sequence[int]
    items: Sequence[Item] = ()

    def ids(self, seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        out: list[int] = []
        for i, n in enumerate(self.text):
            out += torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (n,), generator=gen).tolist()
            if i < len(self.items):
                item = self.items[i]
                placeholder = VIDEO_TOKEN_ID if item.video else IMAGE_TOKEN_ID
                out += [VISION_START_TOKEN_ID, *[placeholder] * item.tokens, VISION_END_TOKEN_ID]
        return out


def token_types(input_ids: Tensor) -> Tensor:
    """`mm_token_type_ids` as the processor makes them: 1 at image, 2 at video placeholders."""
    return (input_ids == IMAGE_TOKEN_ID).long() + 2 * (input_ids == VIDEO_TOKEN_ID).long()


def patch_rows(model, item: Item, seed: int) -> Tensor:
    """[t*h*w, C*T*p*p] flattened patches of one item, as the vision tower expects them."""
    vision = model.config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return torch.randn(
        item.grid[0] * item.grid[1] * item.grid[2], width, generator=torch.Generator().manual_seed(seed)
    )


def qwen_inputs(model, prompts: Sequence[QwenPrompt], seed: int = 0) -> dict[str, Tensor]:
    """A left-padded batch; sample i uses seed + i: alone (seed = i) it has the same ids and pixels."""
    ids, mask = left_padded([p.ids(seed + i) for i, p in enumerate(prompts)])
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": token_types(ids)}
    for video, pixels, grids in (
        (False, "pixel_values", "image_grid_thw"),
        (True, "pixel_values_videos", "video_grid_thw"),
    ):
        items = [
            (item, 1000 * (seed + i) + k)
            for i, p in enumerate(prompts)
            for k, item in enumerate(p.items)
            if item.video == video
        ]
        if items:
            inputs[pixels] = torch.cat([patch_rows(model, item, s) for item, s in items])
            inputs[grids] = torch.tensor([item.grid for item, _ in items])
    return inputs


def _masked(
    model, inputs: dict[str, Tensor], trace, appended: int = 0, config: tp.ReductionConfig | None = None
) -> list:
    valid = inputs["attention_mask"][:, : inputs["attention_mask"].shape[1] - appended].bool()
    masks = oracle_masks(model, removed_positions(trace, valid), valid, extra=appended)
    return masks + renumbering_hooks(model, inputs, trace, config, appended)


@torch.no_grad()
def qwen_oracle_logits(
    model, inputs: dict[str, Tensor], trace, config: tp.ReductionConfig | None = None
) -> Tensor:
    """Prefill logits of the unreduced model, removed tokens masked as keys from their layer on
    (`config`: each stage's position policy; None: `original`)."""
    handles = _masked(model, inputs, trace, config=config)
    try:
        return model(**inputs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def qwen_oracle_greedy(
    model, inputs: dict[str, Tensor], trace, steps: int, config: tp.ReductionConfig | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Greedy continuation without a cache under the mask oracle (eos banned, as `min_new_tokens` does;
    `config`: each stage's position policy, None: `original`)."""
    grown = dict(inputs)
    eos = model.generation_config.eos_token_id
    suppressed = [
        *(model.generation_config.suppress_tokens or []),
        *([eos] if isinstance(eos, int) else eos or []),
    ]
    tokens, logits = [], []
    for step in range(steps):
        handles = _masked(model, grown, trace, appended=step, config=config)
        try:
            last = model(**grown, use_cache=False).logits[:, -1].clone()
        finally:
            for h in handles:
                h.remove()
        last[:, suppressed] = float("-inf")
        nxt = last.argmax(-1)[:, None]
        tokens.append(nxt[:, 0])
        logits.append(last)
        grown["input_ids"] = torch.cat([grown["input_ids"], nxt], dim=1)
        grown["attention_mask"] = torch.cat([grown["attention_mask"], torch.ones_like(nxt)], dim=1)
        grown["mm_token_type_ids"] = torch.cat([grown["mm_token_type_ids"], torch.zeros_like(nxt)], dim=1)
    return torch.stack(tokens, dim=1), logits


def greedy(model, inputs: dict[str, Tensor], steps: int) -> Tensor:
    """[B, steps] greedy tokens from `generate` with the KV cache."""
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[:, -steps:]
