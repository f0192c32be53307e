"""The position policy (`positions: original | renumbered`, docs/positions.md), against its oracles.

- the renumbering rule: property tests of the ids the core gives (contiguous per sample, left
  padding, M-RoPE items keeping their grid offsets), equal to the oracle's token-by-token rule and,
  with nothing removed, to the model's own ids (Qwen2-VL's and Qwen2.5-VL's rope index);
- layer 0: the kept positions' logits equal the unreduced model run on the shortened inputs (removed
  placeholders deleted, kept features in place; max abs diff <= 1e-4), and greedy generation with the
  cache equals that model's greedy run without one;
- K > 0: the renumbered mask oracle (removed tokens masked as keys from layer K on, layers >= K given
  the renumbered ids), prefill and generation; cache == recomputation; a sample alone == in a batch;
- every strategy under the policy its paper does not use (the registry-driven suites run its default).
LLaVA (toy) and Qwen2-VL, SDPA and eager, float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from conftest import BUILT_IN_STRATEGIES
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.adapters.qwen3_vl import Qwen3VLAdapter

import tokenprune as tp
from tokenprune.core.language.forward import cache_of, with_cache
from tokenprune.core.language.positions import renumbered
from tokenprune.errors import AttachError, ConfigError
from tokenprune.lab.config import load_ablation_config
from tokenprune.lab.grid import expand_grid
from tokenprune.lab.run import load_run_config
from tokenprune.testing.families.qwen3_vl import TimedPrompt, toy_qwen3_vl
from tokenprune.testing.models import toy_qwen2_5_vl, toy_qwen2_vl
from tokenprune.testing.oracles import (
    Prompt,
    assert_same_greedy,
    generation_positions,
    greedy,
    llava_inputs,
    oracle_greedy,
    oracle_logits,
    placeholder_items,
    recomputed_greedy,
    renumbered_ids,
    shortened_greedy,
    shortened_inputs,
)
from tokenprune.testing.qwen_inputs import (
    Item,
    QwenPrompt,
    qwen_inputs,
    qwen_oracle_greedy,
    qwen_oracle_logits,
)

LOGIT_TOL = 1e-4
PRUNING = [name for name in BUILT_IN_STRATEGIES if not tp.strategy_class(name).merges]
OTHER = {"original": "renumbered", "renumbered": "original"}
IMPLEMENTATIONS = st.sampled_from(["sdpa", "eager"])  # drawn per example: both backends, half the runs

prompts = st.builds(
    lambda text, images: Prompt(text[: images + 1], images),
    st.lists(st.integers(1, 5), min_size=3, max_size=3),
    st.integers(0, 2),
)
sides = st.sampled_from([2, 4])
items = st.one_of(
    st.builds(lambda h, w: Item((1, h, w)), sides, sides),
    st.builds(lambda t, h, w: Item((t, h, w), video=True), st.integers(1, 3), sides, sides),
)
qwen_prompts = st.builds(
    lambda text, chosen: QwenPrompt(text[: len(chosen) + 1], chosen),
    st.lists(st.integers(1, 3), min_size=3, max_size=3),
    st.lists(items, max_size=2),
)
timed_prompts = qwen_prompts.filter(lambda prompt: prompt.items).map(lambda p: TimedPrompt(p.text, p.items))


@pytest.fixture(scope="module")
def qwen_models():
    return {impl: toy_qwen2_vl(attn_implementation=impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def qwen25():
    return toy_qwen2_5_vl()


@pytest.fixture(scope="module")
def qwen3():
    return toy_qwen3_vl()


def forward(model, inputs, **kwargs):
    """Prefill logits, with `generate`'s position ids for LLaVA (Qwen computes its own)."""
    if model.config.model_type == "llava":
        kwargs["position_ids"] = generation_positions(inputs["attention_mask"])
    return model(**inputs, use_cache=False, **kwargs).logits


def kept_mask(kept: torch.Tensor, length: int) -> torch.Tensor:
    """[B, N] bool of the original positions named in `kept` [B, L] (-1 filler)."""
    mask = torch.zeros(kept.shape[0], length + 1, dtype=torch.bool)
    return mask.scatter_(1, kept.masked_fill(kept < 0, length), True)[:, :length]


def own_ids(model, inputs) -> torch.Tensor:
    """[3, B, N] the model's own M-RoPE ids of `inputs` (its rope index)."""
    rope_inputs = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    return model.model.get_rope_index(**{k: inputs.get(k) for k in rope_inputs}, **extra)[0]


def random_kept(real: torch.Tensor, visual: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, L] left-aligned original positions: every real text token and a random half of the visual ones."""
    drop = visual & (torch.rand(real.shape, generator=torch.Generator().manual_seed(seed)) < 0.5)
    keep = real & ~drop
    width = int(keep.sum(1).max())
    rows = [torch.nonzero(row).squeeze(1) for row in keep]
    return torch.stack([torch.cat([torch.full((width - len(r),), -1), r]) for r in rows])


# -- the rule ----------------------------------------------------------------------------------------


@given(batch=st.lists(prompts, min_size=1, max_size=3), seed=st.integers(0, 99))
def test_one_dimensional_ids_are_contiguous_per_sample_from_generates_first(batch, seed):
    inputs = llava_inputs(batch, tokens_per_image=6)
    real = inputs["attention_mask"].bool()
    own = generation_positions(inputs["attention_mask"])[None]
    kept = random_kept(real, placeholder_items(inputs["input_ids"]) >= 0, seed)
    ids, shift = renumbered(own, torch.full(real.shape, -1), real, kept)
    for b, row in enumerate(kept):
        n = int((row >= 0).sum())
        assert ids[0, b, row >= 0].tolist() == list(range(n))  # left padding: generate counts from 0
        assert ids[0, b, row < 0].eq(0).all()
        assert int(shift[b]) == int(real[b].sum()) - n  # decode continues from the shortened length


@given(batch=st.lists(qwen_prompts, min_size=1, max_size=3), seed=st.integers(0, 99))
def test_m_rope_ids_follow_the_documented_rule(qwen_models, batch, seed):
    model = qwen_models["sdpa"]
    inputs = qwen_inputs(model, batch)
    real, own = inputs["attention_mask"].bool(), own_ids(model, inputs)
    item = placeholder_items(inputs["input_ids"])  # numbered per sample, as the layout's segments
    kept = random_kept(real, item >= 0, seed)
    ids, shift = renumbered(own, item, real, kept)
    expected = renumbered_ids(own, item, real, kept_mask(kept, real.shape[1]))
    for b, row in enumerate(kept):
        slots = row[row >= 0]
        assert torch.equal(ids[:, b, row >= 0], expected[:, b, slots])
        assert int(shift[b]) == int(own[:, b, real[b]].max()) - int(expected[:, b, slots].max())
        for k in item[b, slots][item[b, slots] >= 0].unique():  # an item's kept tokens: offsets apart kept
            mine = item[b, slots] == k
            got, want = ids[:, b, row >= 0][:, mine], own[:, b, slots[mine]]
            assert torch.equal(got - got[:, :1], want - want[:, :1])


def test_a_worked_example_of_the_m_rope_rule():
    """Text, a 1 x 2 x 2 image keeping cells (0,0,1) and (0,1,1), text, a 2 x 1 x 1 video keeping its
    second frame, text; `own` is the model's rope index (text after an item: its start + max(h, w))."""
    own = torch.tensor(
        [
            [0, 1, 2, 2, 2, 2, 4, 5, 6, 6],  # t
            [0, 1, 2, 2, 3, 3, 4, 5, 5, 6],  # h
            [0, 1, 2, 3, 2, 3, 4, 5, 5, 6],  # w
        ]
    )
    segment = torch.tensor([[-1, -1, 0, 0, 0, 0, -1, 1, 1, -1]])
    kept = torch.tensor([[0, 1, 3, 5, 6, 8, 9]])
    ids, shift = renumbered(own[:, None], segment, torch.ones(1, 10, dtype=torch.bool), kept)
    t, h, w = ids[:, 0].tolist()
    assert t == [0, 1, 2, 2, 4, 6, 6]  # the image from 2, its kept cells at t + 0; the video from 5, frame 1
    assert h == [0, 1, 2, 3, 4, 5, 6]  # cells of rows 0 and 1; text after the image: 2 + max(1, 1) + 1
    assert w == [0, 1, 3, 3, 4, 5, 6]  # both cells in column 1; text after the video: 5 + 0 + 1
    assert shift.tolist() == [0]  # the largest id, 6, as the model's: decode continues from 7 alike


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@given(batch=st.lists(qwen_prompts, min_size=1, max_size=3))
def test_nothing_removed_gives_the_models_own_ids(qwen_models, qwen25, family, batch):
    model = qwen_models["sdpa"] if family == "qwen2_vl" else qwen25
    inputs = qwen_inputs(model, batch)
    if family == "qwen2_5_vl" and "video_grid_thw" in inputs:  # temporal ids 3 apart
        inputs["second_per_grid_ts"] = torch.full((len(inputs["video_grid_thw"]),), 1.5)
    real, own = inputs["attention_mask"].bool(), own_ids(model, inputs)
    item = placeholder_items(inputs["input_ids"])
    kept = random_kept(real, torch.zeros_like(real), 0)
    ids, _ = renumbered(own, torch.where(item >= 0, item, -1), real, kept)
    for b, row in enumerate(kept):
        assert torch.equal(ids[:, b, row >= 0], own[:, b, row[row >= 0]])


@example(batch=[TimedPrompt([1, 1], [Item((2, 4, 4), video=True)])], seed=0)
@given(batch=st.lists(timed_prompts, min_size=1, max_size=3), seed=st.integers(0, 99))
def test_qwen3_vl_numbers_each_timestamped_temporal_patch_as_a_grid(qwen3, batch, seed):
    """A Qwen3-VL video is one item (segment) whose temporal patches stand apart behind timestamp text, each
    a grid of the model's own: with nothing removed the rule gives the model's ids, else the oracle's."""
    inputs = qwen_inputs(qwen3, batch)
    real, own = inputs["attention_mask"].bool(), own_ids(qwen3, inputs)
    segment = Qwen3VLAdapter(qwen3).visual_layout(inputs).segment
    everything = random_kept(real, torch.zeros_like(real), 0)
    ids, _ = renumbered(own, segment, real, everything)
    for b, row in enumerate(everything):
        assert torch.equal(ids[:, b, row >= 0], own[:, b, row[row >= 0]])
    kept = random_kept(real, segment >= 0, seed)
    ids, _ = renumbered(own, segment, real, kept)
    runs = placeholder_items(inputs["input_ids"])  # the oracle's items: runs of placeholders
    expected = renumbered_ids(own, runs, real, kept_mask(kept, real.shape[1]))
    for b, row in enumerate(kept):
        assert torch.equal(ids[:, b, row >= 0], expected[:, b, row[row >= 0]])


# -- the configuration --------------------------------------------------------------------------------


def test_the_policy_resolves_stage_then_config_then_strategy():
    assert tp.strategy_class("fastv").positions == "original"
    assert tp.strategy_class("divprune").positions == "renumbered"
    config = tp.ReductionConfig(strategy="divprune", layer=0, keep=8)
    assert config.position_policy(config.stages[0]) == "renumbered"
    config = tp.ReductionConfig(strategy="divprune", layer=0, keep=8, positions="original")
    assert config.position_policy(config.stages[0]) == "original"
    config = tp.ReductionConfig(
        strategy="fastv",
        positions="renumbered",
        stages=[{"layer": 1, "keep": 8}, {"layer": 2, "keep": 4, "positions": "original"}],
    )
    assert [config.position_policy(s) for s in config.stages] == ["renumbered", "original"]
    with pytest.raises(ValidationError, match="positions"):
        tp.ReductionConfig(layer=2, ratio=0.5, positions="contiguous")


def test_load_config_reads_the_policy(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "strategy: pdrop\nstages:\n"
        "  - {layer: 1, ratio: 0.5, positions: original}\n  - {layer: 2, ratio: 0.75}\n"
    )
    config = tp.load_config(path)
    assert [config.position_policy(s) for s in config.stages] == ["original", "renumbered"]
    path.write_text("reduction: {strategy: fastv, layer: 2, ratio: 0.5, positions: renumbered}\n")
    assert load_run_config(path).reduction.positions == "renumbered"  # `tokenprune run`'s config
    path.write_text("strategy: fastv\nlayer: 2\nratio: 0.5\npositions: sideways\n")
    with pytest.raises(ConfigError, match="positions"):
        tp.load_config(path)


def test_an_ablation_cell_sets_the_policy_and_its_key_says_so(tmp_path):
    extra = [{"strategy": "divprune", "layer": 0, "keep": 9}]
    extra.append({**extra[0], "positions": "original"})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"grid": {"strategies": ["fastv"], "ratios": [0.5], "extra": extra}}))
    default, original = expand_grid(load_ablation_config(path))[-2:]
    assert default.config()["reduction"]["positions"] is None  # the strategy's own: renumbered
    assert original.config()["reduction"]["positions"] == "original"
    assert default.key != original.key


def test_renumbered_is_refused_without_a_rotary_module(llava_sdpa, monkeypatch):
    monkeypatch.setattr(LlavaAdapter, "rotary_embedding", lambda self: None)
    with pytest.raises(AttachError, match="rotary"):
        tp.attach(
            llava_sdpa, tp.ReductionConfig(strategy="random", layer=0, ratio=0.5, positions="renumbered")
        )
    tp.attach(
        llava_sdpa, tp.ReductionConfig(strategy="random", layer=0, ratio=0.5, positions="original")
    ).detach()


# -- LLaVA --------------------------------------------------------------------------------------------


@torch.no_grad()
@given(batch=st.lists(prompts, min_size=1, max_size=3), ratio=st.floats(0.1, 0.9), impl=IMPLEMENTATIONS)
def test_layer_0_equals_the_unreduced_model_on_the_shortened_inputs(
    llava_sdpa, llava_eager, batch, ratio, impl
):
    llava = llava_sdpa if impl == "sdpa" else llava_eager
    inputs = llava_inputs(batch)
    config = tp.ReductionConfig(strategy="random", layer=0, ratio=ratio, positions="renumbered")
    with tp.attach(llava, config) as handle:
        logits = forward(llava, inputs)
        kept = handle.trace[0].kept
        tokens, _ = greedy(llava, inputs, 4)
    short = shortened_inputs(llava, inputs, kept, generation_positions(inputs["attention_mask"]))
    expected = llava(**short, use_cache=False).logits
    for b, row in enumerate(kept):
        assert (logits[b, row[row >= 0]] - expected[b, row >= 0]).abs().max() <= LOGIT_TOL
    assert_same_greedy(tokens, *shortened_greedy(llava, short, 4))


@torch.no_grad()
@pytest.mark.parametrize("strategy", PRUNING)
def test_every_strategy_under_its_other_policy_matches_the_oracle(llava_sdpa, strategy):
    """The registry-driven suites run each strategy's own default; here the other one, prefill and greedy."""
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([5, 1], 1)])
    policy = OTHER[tp.strategy_class(strategy).positions]
    config = tp.ReductionConfig(strategy=strategy, layer=1, ratio=0.5, positions=policy)
    assert_matches_the_mask_oracle(llava_sdpa, inputs, config)


def assert_matches_the_mask_oracle(model, inputs, config, steps: int = 3) -> None:
    """Kept prefill logits (max abs diff <= LOGIT_TOL) and cached greedy tokens equal the mask oracle's."""
    with tp.attach(model, config) as handle:
        logits = forward(model, inputs)
        trace = handle.trace
        tokens, _ = greedy(model, inputs, steps)
    expected = oracle_logits(model, inputs, trace, config=config)
    for b, row in enumerate(trace[-1].kept):
        assert (logits[b, row[row >= 0]] - expected[b, row[row >= 0]]).abs().max() <= LOGIT_TOL
    assert_same_greedy(tokens, *oracle_greedy(model, inputs, trace, steps, config=config))


@torch.no_grad()
@given(
    batch=st.lists(prompts, min_size=1, max_size=3),
    layer=st.integers(1, 3),
    ratio=st.floats(0.1, 0.9),
    impl=IMPLEMENTATIONS,
)
def test_the_renumbered_mask_oracle_on_random_batches(llava_sdpa, llava_eager, batch, layer, ratio, impl):
    llava = llava_sdpa if impl == "sdpa" else llava_eager
    config = tp.ReductionConfig(strategy="fastv", layer=layer, ratio=ratio, positions="renumbered")
    assert_matches_the_mask_oracle(llava, llava_inputs(batch), config)


@torch.no_grad()
@pytest.mark.parametrize(
    "policies", [("renumbered", "original"), ("original", "renumbered"), ("renumbered", "renumbered")]
)
def test_schedules_mixing_policies_match_the_renumbered_mask_oracle(llava, policies):
    inputs = llava_inputs([Prompt([2, 3, 1], 2), Prompt([5, 1], 1), Prompt([1, 4], 1)])
    stages = [
        {"layer": 1, "ratio": 0.4, "positions": policies[0]},
        {"layer": 3, "ratio": 0.7, "positions": policies[1]},
    ]
    assert_matches_the_mask_oracle(llava, inputs, tp.ReductionConfig(strategy="fastv", stages=stages))


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_generation_with_the_cache_equals_recomputation(llava_sdpa, layer):
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    config = tp.ReductionConfig(strategy="random", layer=layer, ratio=0.6, positions="renumbered")
    with tp.attach(llava_sdpa, config):
        cached, _ = greedy(llava_sdpa, inputs, 5)
        recomputed = recomputed_greedy(llava_sdpa, inputs, 5)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_a_sample_alone_equals_the_same_sample_in_a_batch(llava, layer):
    batch = [Prompt([2, 3, 1], 2), Prompt([5, 1], 1), Prompt([1, 4], 1)]
    inputs = llava_inputs(batch)
    first_image = [sum(p.images for p in batch[:b]) for b in range(len(batch))]
    config = tp.ReductionConfig(strategy="uniform", layer=layer, ratio=0.6, positions="renumbered")
    with tp.attach(llava, config):
        together, _ = greedy(llava, inputs, 3)
        for b, prompt in enumerate(batch):
            alone = llava_inputs([prompt], seed=b)
            alone["pixel_values"] = inputs["pixel_values"][first_image[b] : first_image[b] + prompt.images]
            tokens, logits = greedy(llava, alone, 3)
            assert_same_greedy(together[b : b + 1], tokens, logits)


@torch.no_grad()
def test_a_continuation_and_a_copied_cache_continue_from_the_renumbered_prompt(llava_sdpa):
    """A chat turn of several tokens on the reduced cache, and on a deep copy of it, equals the oracle."""
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    new = torch.randint(10, 120, (2, 3), generator=torch.Generator().manual_seed(4))
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)
    positions, length = generation_positions(mask), inputs["input_ids"].shape[1]
    config = tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.6, positions="renumbered")
    with tp.attach(llava_sdpa, config) as handle:
        first = llava_sdpa(**inputs, position_ids=positions[:, :length], use_cache=True)
        trace = handle.trace
        turn = {
            "input_ids": new,
            "attention_mask": mask,
            "position_ids": positions[:, length:],
            "use_cache": True,
        }
        copied = llava_sdpa(**turn, **with_cache(copy.deepcopy(cache_of(first)))).logits
        second = llava_sdpa(**turn, **with_cache(cache_of(first))).logits
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], new], 1), "attention_mask": mask}
    expected = oracle_logits(llava_sdpa, full, trace, appended=new.shape[1], config=config)[:, length:]
    assert (second - expected).abs().max() <= LOGIT_TOL
    assert torch.equal(copied, second)


@torch.no_grad()
def test_the_trace_reports_original_positions_whatever_the_policy(llava_sdpa):
    inputs = llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])
    kept = []
    for policy in ("original", "renumbered"):
        config = tp.ReductionConfig(strategy="random", layer=0, ratio=0.5, positions=policy)
        with tp.attach(llava_sdpa, config) as handle:
            forward(llava_sdpa, inputs)
            kept.append(handle.trace[0].kept)
    assert torch.equal(kept[0], kept[1])
    assert (
        int(kept[1].max()) == inputs["input_ids"].shape[1] - 1
    )  # the last prompt token, by original position


# -- Qwen2-VL -------------------------------------------------------------------------------------------


def qwen_greedy(model, inputs, steps: int) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[:, -steps:]


def banned(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.no_grad()
@given(batch=st.lists(qwen_prompts, min_size=1, max_size=3), ratio=st.floats(0.1, 0.9), impl=IMPLEMENTATIONS)
def test_qwen_layer_0_equals_the_unreduced_model_on_the_shortened_inputs(qwen_models, impl, batch, ratio):
    model = qwen_models[impl]
    inputs = qwen_inputs(model, batch)
    config = tp.ReductionConfig(strategy="uniform", layer=0, ratio=ratio, positions="renumbered")
    with tp.attach(model, config) as handle:
        logits = forward(model, inputs)
        kept = handle.trace[0].kept
        tokens = qwen_greedy(model, inputs, 3)
    short = shortened_inputs(model, inputs, kept)
    expected = model(**short, use_cache=False).logits
    for b, row in enumerate(kept):
        assert (logits[b, row[row >= 0]] - expected[b, row >= 0]).abs().max() <= LOGIT_TOL
    assert_same_greedy(tokens, *shortened_greedy(model, short, 3, banned(model)))


@torch.no_grad()
@given(
    batch=st.lists(qwen_prompts, min_size=1, max_size=3),
    layer=st.integers(1, 3),
    ratio=st.floats(0.1, 0.9),
    impl=IMPLEMENTATIONS,
)
def test_qwen_renumbered_mask_oracle(qwen_models, impl, batch, layer, ratio):
    model = qwen_models[impl]
    inputs = qwen_inputs(model, batch)
    config = tp.ReductionConfig(strategy="fastv", layer=layer, ratio=ratio, positions="renumbered")
    with tp.attach(model, config) as handle:
        logits = forward(model, inputs)
        trace = handle.trace
        tokens = qwen_greedy(model, inputs, 3)
    expected = qwen_oracle_logits(model, inputs, trace, config=config)
    for b, row in enumerate(trace[-1].kept):
        assert (logits[b, row[row >= 0]] - expected[b, row[row >= 0]]).abs().max() <= LOGIT_TOL
    assert_same_greedy(tokens, *qwen_oracle_greedy(model, inputs, trace, 3, config=config))


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_qwen_a_sample_alone_equals_the_same_sample_in_a_batch(qwen_models, layer):
    model = qwen_models["sdpa"]
    batch = [
        QwenPrompt([2, 1, 3], [Item((1, 4, 6)), Item((2, 4, 4), video=True)]),
        QwenPrompt([1, 2], [Item((1, 2, 4))]),
    ]
    config = tp.ReductionConfig(strategy="random", layer=layer, ratio=0.5, positions="renumbered")
    with tp.attach(model, config):
        together = qwen_greedy(model, qwen_inputs(model, batch), 3)
        alone = [qwen_greedy(model, qwen_inputs(model, [p], seed=b), 3) for b, p in enumerate(batch)]
    assert torch.equal(together, torch.cat(alone))


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_qwen2_5_video_with_spaced_temporal_ids(qwen25, layer):
    """Qwen2.5-VL numbers a video's time steps 3 apart: kept tokens keep those offsets; the oracles agree."""
    inputs = qwen_inputs(
        qwen25, [QwenPrompt([2, 3], [Item((3, 4, 4), video=True)]), QwenPrompt([1, 1], [Item((1, 2, 4))])]
    )
    inputs["second_per_grid_ts"] = torch.full((1,), 1.5)
    config = tp.ReductionConfig(strategy="random", layer=layer, ratio=0.5, positions="renumbered")
    with tp.attach(qwen25, config) as handle:
        logits = forward(qwen25, inputs)
        trace = handle.trace
        tokens = qwen_greedy(qwen25, inputs, 3)
    expected = qwen_oracle_logits(qwen25, inputs, trace, config=config)
    for b, row in enumerate(trace[-1].kept):
        assert (logits[b, row[row >= 0]] - expected[b, row[row >= 0]]).abs().max() <= LOGIT_TOL
    assert_same_greedy(tokens, *qwen_oracle_greedy(qwen25, inputs, trace, 3, config=config))
