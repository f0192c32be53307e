"""FLOPs models: the FastV paper's table, a hand count of a gated Llama layer, and a traced reduced run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaModel

import tokenprune as tp
from tokenprune.core.selection import ReductionEvent
from tokenprune.flops import (
    LayerShape,
    layer_flops,
    model_flops,
    paper_layer_flops,
    paper_per_layer_billions,
    paper_reduction,
    tokens_per_layer,
    tower_flops,
    trace_flops,
)
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava
from tokenprune.testing.oracles import Prompt, llava_inputs

SYSTEM, IMAGE = 36, 576  # the paper's n = 612


@pytest.mark.parametrize(
    ("layers", "d", "m", "full", "reduced"),
    [
        (40, 5120, 13824, 154.6, 84.6),  # LLaVA-1.5-13B
        (32, 4096, 11008, 99.3, 54.8),  # LLaVA-1.5-7B
    ],
)
def test_paper_table(layers: int, d: int, m: int, full: float, reduced: float) -> None:
    got = paper_per_layer_billions(SYSTEM + IMAGE, SYSTEM + IMAGE // 2, d, m, layers, k=2)
    assert (round(got[0], 1), round(got[1], 1)) == (full, reduced)


def test_paper_reduction_13b() -> None:
    remaining = 1 - paper_reduction(SYSTEM + IMAGE, SYSTEM + IMAGE // 2, 5120, 13824, layers=40, k=2)
    assert round(100 * remaining, 1) == 54.7


def test_paper_layer_formula() -> None:
    assert paper_layer_flops(n=3, d=2, m=5) == 4 * 3 * 4 + 2 * 9 * 2 + 2 * 3 * 2 * 5


TINY = LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_implementation="eager",
)


def test_gated_gqa_layer_by_hand() -> None:
    # d=16, 4 heads x head_dim 4 (q, o: 16 wide), 2 kv heads (k, v: 8 wide), m=24, n=7 tokens, kv=7
    n = 7
    q = o = 2 * n * 16 * 16
    k = v = 2 * n * 16 * 8
    scores = weighted = 2 * n * n * 4 * 4
    gate = up = down = 2 * n * 16 * 24
    hand = q + k + v + o + scores + weighted + gate + up + down
    assert layer_flops(LayerShape.from_config(TINY), n) == hand
    assert model_flops(TINY, [n, n]) == 2 * hand


def test_matches_torch_flop_counter() -> None:
    model = LlamaModel(TINY).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 32, (1, 7)))
    assert counter.get_total_flops() == model_flops(TINY, [7, 7])


def test_decode_step_counts_cache() -> None:
    shape = LayerShape.from_config(TINY)
    assert model_flops(TINY, [1, 1], kv_lengths=[9, 5]) == layer_flops(shape, 1, 9) + layer_flops(shape, 1, 5)
    with pytest.raises(ValueError, match="token counts"):
        model_flops(TINY, [1, 1, 1])


def test_tokens_per_layer_without_trace_and_batched() -> None:
    assert tokens_per_layer(3, [], 10) == [[10, 10, 10]]
    events = [
        ReductionEvent(1, [10, 8], [6, 5], [6, 4], [2, 1], torch.zeros(2, 6)),
        ReductionEvent(3, [6, 5], [4, 4], [2, 1], [0, 0], torch.zeros(2, 4)),
    ]
    assert tokens_per_layer(4, events[::-1], [10, 8]) == [[10, 6, 6, 4], [8, 5, 5, 4]]


def _traced_fastv_run() -> tuple[torch.nn.Module, list[ReductionEvent], int, dict[int, int]]:
    """FastV K=2 R=0.5 on the 4-layer toy LLaVA (36 image tokens); eager, so torch counts attention."""
    model = toy_llava(attn_implementation="eager")
    text = torch.randint(10, 120, (1, 14), generator=torch.Generator().manual_seed(0))
    input_ids = torch.cat([text[:, :5], torch.full((1, 36), IMAGE_TOKEN_ID), text[:, 5:]], dim=1)
    pixel_values = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    with tp.attach(model, tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.5)) as handle:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=input_ids, pixel_values=pixel_values)
        trace = handle.trace
    return model, trace, input_ids.shape[1], _per_layer(counter)


DECODER = "LlavaForConditionalGeneration.model.language_model.layers."


def _per_layer(counter: FlopCounterMode, prefix: str = DECODER) -> dict[int, int]:
    """FLOPs torch counted inside each layer module under `prefix` (hooks of the layer included)."""
    return {
        int(name[len(prefix) :]): sum(counts.values())
        for name, counts in counter.get_flop_counts().items()
        if name.startswith(prefix) and name[len(prefix) :].isdigit()
    }


def test_reduced_run_counts() -> None:
    model, trace, n, measured = _traced_fastv_run()
    config = model.config.text_config
    kept = n - 18  # 50 tokens, 36 visual, R = 0.5 removes 18
    assert tokens_per_layer(4, trace, n) == [[n, n, kept, kept]]

    shape = LayerShape.from_config(config)
    full, reduced = trace_flops(config, [], n)[0], trace_flops(config, trace, n)[0]
    assert full - reduced == 2 * (layer_flops(shape, n) - layer_flops(shape, kept))

    # torch's own counter sees the layers really run at those lengths. Layer 2 also carries the
    # FastV score, computed in its pre-hook: one query row of layer 1 and one row of logits (the
    # keys are the ones layer 1 projected anyway).
    assert measured[0] == layer_flops(shape, n)
    assert measured[3] == layer_flops(shape, kept)
    width = shape.heads * shape.head_dim
    score = 2 * shape.hidden * width + 2 * n * width
    assert measured[2] == layer_flops(shape, kept) + score


# -- vision-site runs: the tower's reductions reach the decoder through layer 0 -------------------


def _vision_site_run(prompts: list[Prompt], layer: int, ratio: float):
    """A `site: vision` stage at tower layer `layer` on a toy LLaVA whose CLIP tower has 3 layers;
    returns (model, trace, real tokens per sample, FLOPs torch counted per tower layer). Eager attention:
    torch's counter does not count SDPA's CPU kernel."""
    model = toy_llava(ToySize(vision_layers=3), attn_implementation="eager")
    inputs = llava_inputs(prompts)
    config = tp.ReductionConfig(
        strategy="random", stages=[{"site": "vision", "layer": layer, "ratio": ratio}]
    )
    with tp.attach(model, config) as handle:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs)
        trace = handle.trace
    tower = "LlavaForConditionalGeneration.model.vision_tower.encoder.layers."
    return model, trace, inputs["attention_mask"].sum(dim=1).tolist(), _per_layer(counter, tower)


def test_a_vision_site_past_tower_layer_0_removes_its_tokens_from_every_decoder_layer() -> None:
    """Decoder layers see the placeholders the tower kept, from layer 0 on: 18 of 36 removed at R=0.5."""
    model, trace, tokens, _ = _vision_site_run([Prompt([3, 4], 1)], layer=1, ratio=0.5)
    assert {event.site for event in trace} == {"vision", "language"}
    n = tokens[0]
    assert tokens_per_layer(4, trace, n) == [[n - 18] * 4]
    shape = LayerShape.from_config(model.config.text_config)
    assert trace_flops(model.config.text_config, trace, n) == [4 * layer_flops(shape, n - 18)]


def test_samples_holding_different_numbers_of_images() -> None:
    """Two samples with 1 and 2 images: the tower's batch holds 3 items, the decoder's 2 samples."""
    model, trace, tokens, _ = _vision_site_run([Prompt([2, 5], 1), Prompt([1, 2, 3], 2)], layer=1, ratio=0.5)
    removed = [18, 36]  # 18 of each image's 36 patches
    assert tokens_per_layer(4, trace, tokens) == [[n - r] * 4 for n, r in zip(tokens, removed, strict=True)]
    shape = LayerShape.from_config(model.config.text_config)
    expected = [4 * layer_flops(shape, n - r) for n, r in zip(tokens, removed, strict=True)]
    assert trace_flops(model.config.text_config, trace, tokens) == expected


@pytest.mark.parametrize("layer", [0, 1])
def test_tower_flops_match_torch_flop_counter(layer: int) -> None:
    """Tower layers <= the site's run on 1 + 36 tokens per image, later ones on 1 + 18: torch agrees
    exactly, layer by layer (the random strategy asks for no signal, so nothing else runs there)."""
    model, trace, _, measured = _vision_site_run([Prompt([2, 5], 1), Prompt([1, 2, 3], 2)], layer, 0.5)
    vision = model.config.vision_config
    shape = LayerShape.from_config(vision, gated=False)
    per_image = [layer_flops(shape, 37 if index <= layer else 19) for index in range(3)]
    assert measured == {index: 3 * flops for index, flops in enumerate(per_image)}
    assert tower_flops(vision, trace, 37) == [sum(per_image)] * 3
    assert tower_flops(vision, [], [37, 37]) == [3 * layer_flops(shape, 37)] * 2
