"""LLaVA-NeXT: variable token counts per image (anyres tiles, unpadding) and row newlines."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenprune.adapters.llava_next import LlavaNextAdapter
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import tokenprune as tp
from tokenprune.contracts.layout import SEGMENT_KINDS
from tokenprune.testing.models import IMAGE_TOKEN_ID
from tokenprune.testing.oracles import (
    Prompt,
    assert_same_greedy,
    generation_positions,
    left_padded,
    oracle_greedy,
    oracle_logits,
)

SIZES = st.tuples(st.integers(12, 60), st.integers(12, 60))


def next_inputs(model, prompts: list[Prompt], sizes: list[tuple[int, int]], seed: int = 0):
    """A left-padded LLaVA-NeXT batch; `sizes` holds each image's (height, width), in batch order."""
    image_sizes = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
    counts = LlavaNextAdapter(model).tokens_per_image({"image_sizes": image_sizes}, None)
    rows, first = [], 0
    for i, p in enumerate(prompts):
        rows.append(p.ids(counts[first : first + p.images], seed + i))
        first += p.images
    ids, mask = left_padded(rows)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if sizes:
        tiles = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, 24) for s in sizes]
        gen = torch.Generator().manual_seed(seed)
        inputs["pixel_values"] = torch.randn(len(sizes), max(tiles), 3, 24, 24, generator=gen)
        inputs["image_sizes"] = image_sizes
    return inputs


@torch.no_grad()
def test_layout_matches_the_model_and_protects_newlines(llava_next):
    inputs = next_inputs(llava_next, [Prompt([2, 1, 3], 2)], [(24, 40), (50, 20)])
    layout = LlavaNextAdapter(llava_next).visual_layout(inputs)
    placeholders = inputs["input_ids"] == IMAGE_TOKEN_ID
    newlines = placeholders & ~layout.visual
    assert int(newlines.sum()) == 6 + 12  # one per high-resolution row
    assert sorted(map(tuple, layout.extent[layout.visual].unique(dim=0).tolist())) == [
        (1, 6, 6),
        (1, 6, 10),
        (1, 12, 4),
    ]
    base_grids = (layout.extent == torch.tensor([1, 6, 6])).all(dim=-1)  # each image's low-resolution view
    assert torch.equal(layout.kind == SEGMENT_KINDS.index("base"), base_grids)
    assert torch.equal(layout.kind == SEGMENT_KINDS.index("grid"), layout.visual & ~base_grids)
    llava_next(**inputs)  # the model itself accepts the placeholder counts


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["fastv", "uniform", "random"])
@given(sizes=st.lists(SIZES, min_size=1, max_size=3), ratio=st.floats(0.0, 0.9), layer=st.integers(1, 3))
def test_llava_next_oracles(llava_next, strategy, sizes, ratio, layer):
    prompts = [Prompt([3, 2], 1)] + [Prompt([1, 2], 1) for _ in sizes[1:]]
    inputs = next_inputs(llava_next, prompts, sizes)
    with tp.attach(llava_next, tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio)) as handle:
        logits = llava_next(
            **inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False
        ).logits
        trace = handle.trace
        out = llava_next.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(handle.trace[0].kept, trace[0].kept)  # generate's pre-encoded images: same layout
    expected = oracle_logits(llava_next, inputs, trace)
    for b, row in enumerate(trace[0].kept):
        row = row[row >= 0]
        assert (logits[b, row] - expected[b, row]).abs().max() <= 1e-4
        newline = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        n_visual = trace[0].visual_before[b]
        assert trace[0].visual_after[b] == round(n_visual * (1 - ratio))
        assert (
            int((inputs["input_ids"][b, row] == IMAGE_TOKEN_ID).sum())
            == len(newline) - n_visual + trace[0].visual_after[b]
        )
    tokens, step_logits = oracle_greedy(llava_next, inputs, trace, 3)
    assert_same_greedy(out[:, -3:], tokens, step_logits)
