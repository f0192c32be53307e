"""The adapter conformance suite: every exactness check of tokenprune, against any adapter, given a `Family`.

Subclass `AdapterConformance` in a test module and name the family:

    class TestMyAdapter(AdapterConformance):
        family = MY_FAMILY

pytest then runs each check below on the family's tiny models (float32, SDPA unless said). The
oracles are those of `tokenprune.testing.exactness`; tolerances are max abs differences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.core.masks import has_local_rules
from tokenprune.core.selection import ReductionEvent
from tokenprune.testing.cache_oracle import assert_steps_match, cache_oracle_run
from tokenprune.testing.cache_oracle import generate as cache_generate
from tokenprune.testing.exactness import (
    forward,
    mask_oracle_greedy,
    mask_oracle_hooks,
    mask_oracle_logits,
    merge_oracle_greedy,
    merge_oracle_logits,
    recomputed_greedy,
)
from tokenprune.testing.family import Family, Sample
from tokenprune.testing.oracles import assert_kept_logits_match, assert_same_greedy, greedy, hooked
from tokenprune.testing.oracles import tower_mask_hooks as tower_oracle_hooks

LOGIT_TOL = 1e-4  # kept logits against an oracle
IDENTITY_TOL = 1e-5  # ratio 0 against no attachment
STEPS = 3  # greedy decode steps
LAYER = 2  # K of the language-model checks: layers 0 and 1 see every token
BACKENDS = ("sdpa", "eager")


def samples(family: Family) -> list[Sample]:
    """A batch of two samples with different item counts (the family's most, and one fewer)."""
    most = family.max_items
    return [Sample((2, 1, 3, 2, 1)[: most + 1], most), Sample((4, 2, 1, 3, 2)[:most], most - 1)]


def language(strategy: str, layer: int = LAYER, ratio: float = 0.5) -> tp.ReductionConfig:
    """One language-model stage of `strategy` at `layer` (defaults and position policy its own)."""
    return tp.ReductionConfig(strategy=strategy, layer=layer, ratio=ratio)


def vision(strategy: str, ratio: float = 0.5) -> tp.ReductionConfig:
    """One stage of `strategy` after the first layer of the vision towers."""
    return tp.ReductionConfig(strategy=strategy, stages=[{"site": "vision", "layer": 0, "ratio": ratio}])


def cache(strategy: str, layer: int = 1, ratio: float = 0.5) -> tp.ReductionConfig:
    """One `site: cache` stage of `strategy`: layer K's cache pruned before every decode step (window 2)."""
    stage = {"site": "cache", "layer": layer, "ratio": ratio, "every": 1, "window": 2}
    return tp.ReductionConfig(strategy=strategy, stages=[stage])


def at_site(strategy: str, site: str) -> tp.ReductionConfig:
    """The suite's one-stage config of `strategy` at a kind of site ("language", "vision" or "cache")."""
    return {"language": language, "vision": vision, "cache": cache}[site](strategy)


def strategy_sites() -> list[tuple[str, str]]:
    """(strategy, site) for every installed strategy and every site it acts at."""
    return [(name, site) for name in tp.list_strategies() for site in sorted(tp.strategy_class(name).sites)]


def offsets(inputs: dict[str, Tensor]) -> Tensor:
    """[B] left padding of each row."""
    return (1 - inputs["attention_mask"]).sum(1)


def kept_row(event: ReductionEvent, b: int) -> Tensor:
    """The positions sample `b` kept, without the -1 filler."""
    row = event.kept[b]
    return row[row >= 0]


def layer_kwargs(layers: Sequence[nn.Module], watched: Sequence[int]) -> tuple[dict[int, list[dict]], list]:
    """Pre-hooks recording the keyword inputs of the watched decoder layers at every forward."""
    seen: dict[int, list[dict]] = {i: [] for i in watched}
    handles = [
        layers[i].register_forward_pre_hook(lambda m, a, kw, i=i: seen[i].append(kw), with_kwargs=True)
        for i in watched
    ]
    return seen, handles


@contextmanager
def merges_returned(reducer: tp.Reducer) -> Iterator[list[tp.Merge]]:
    """Record the `Merge`s the reducer's `select` returns (the trace does not keep how a merge combines)."""
    seen: list[tp.Merge] = []
    select = reducer.select

    def recording(view: tp.TokenView) -> Tensor | tp.Merge:
        selection = select(view)
        if isinstance(selection, tp.Merge):
            seen.append(selection)
        return selection

    reducer.select = recording
    try:
        yield seen
    finally:
        del reducer.select


@contextmanager
def tower_runs(towers: Sequence) -> Iterator[list[int]]:
    """Record, in order, which vision tower (index into `towers`) runs: each run emits its vision events."""
    order: list[int] = []
    handles = [
        tower.layers[0].register_forward_pre_hook(lambda m, a, k=k: order.append(k))
        for k, tower in enumerate(towers)
    ]
    with hooked(handles):
        yield order


def module_state(model: nn.Module) -> dict[str, tuple]:
    """Per module: its hooks, the names of its instance attributes and its `forward` (weights apart)."""
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {
        name: (
            tuple(tuple(getattr(module, d)) for d in hook_dicts),
            tuple(sorted(vars(module))),
            module.forward.__func__ if hasattr(module.forward, "__func__") else module.forward,
        )
        for name, module in model.named_modules()
    }


class AdapterConformance:
    """The conformance checks of one model family; a subclass sets `family` (or overrides the fixture)."""

    family: ClassVar[Family | None] = None

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_family(cls) -> Family:
        """The family under test: the class attribute (a registry-driven subclass parametrises this)."""
        if cls.family is None:
            raise TypeError(f"{cls.__name__} must set `family = Family(...)`")
        return cls.family

    @pytest.fixture(scope="class")
    @classmethod
    def models(cls, conformance_family: Family) -> dict[str, nn.Module]:
        """The family's tiny model under each attention backend the core builds masks for."""
        return {backend: conformance_family.model(backend) for backend in BACKENDS}

    @pytest.fixture(scope="class")
    @classmethod
    def batch(cls, conformance_family: Family, models: dict[str, nn.Module]) -> dict[str, Tensor]:
        """The suite's batch of two samples with different item counts, for the SDPA model."""
        return conformance_family.inputs(models["sdpa"], samples(conformance_family), 0)

    # -- the mask oracle ------------------------------------------------------------------------

    @torch.no_grad()
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_mask_oracle_at_layer_k(self, conformance_family, models, backend):
        """Pruning at layer K: kept logits equal the unreduced model with removed keys masked from K on."""
        model = models[backend]
        inputs = conformance_family.inputs(model, samples(conformance_family), 0)
        self.assert_mask_oracle(conformance_family, model, inputs, language("fastv"))

    @torch.no_grad()
    def test_mask_oracle_before_the_language_model(self, conformance_family, models, batch):
        """Pruning at layer 0: removed tokens are masked as keys in every decoder layer."""
        self.assert_mask_oracle(conformance_family, models["sdpa"], batch, language("random", layer=0))

    @torch.no_grad()
    def test_mask_oracle_of_two_stages(self, conformance_family, models, batch):
        """A schedule: each stage's removed keys masked from its own layer on, the cache of the layers
        between stages holding the first stage's tokens (random: no layer's attention is needed, which
        sliding-window layers could not give)."""
        stages = [{"layer": 1, "ratio": 0.3}, {"layer": 3, "ratio": 0.7}]
        config = tp.ReductionConfig(strategy="random", stages=stages)
        self.assert_mask_oracle(conformance_family, models["sdpa"], batch, config)

    @staticmethod
    def assert_mask_oracle(family: Family, model: nn.Module, inputs: dict, config: tp.ReductionConfig):
        """One stage per configured stage, and the kept logits equal the mask oracle's."""
        with tp.attach(model, config, adapter=family.adapter) as handle:
            logits = forward(family, model, inputs)
            trace = handle.trace
        assert len(trace) == len(config.stages)
        expected = mask_oracle_logits(family, model, inputs, trace, config)
        assert_kept_logits_match(logits, expected, trace[-1].kept, LOGIT_TOL)

    # -- identity, batches, the cache, positions -------------------------------------------------------

    @torch.no_grad()
    @pytest.mark.parametrize("layer", [0, LAYER])
    def test_ratio_zero_is_identity(self, conformance_family, models, batch, layer):
        """Removing nothing changes no logit of a real token (<= 1e-5)."""
        model = models["sdpa"]
        reference = forward(conformance_family, model, batch)
        strategy = "random" if layer == 0 else "fastv"
        with tp.attach(model, language(strategy, layer, 0.0), adapter=conformance_family.adapter):
            logits = forward(conformance_family, model, batch)
        real = batch["attention_mask"].bool()
        assert (logits - reference)[real].abs().max() <= IDENTITY_TOL

    @torch.no_grad()
    def test_batch_equals_each_sample_alone(self, conformance_family, models, batch):
        """In a left-padded batch of samples with different item counts, each keeps the same tokens and
        generates the same text as alone (sample i alone: the family's inputs of [sample i], seed i)."""
        model, family = models["sdpa"], conformance_family
        pad = offsets(batch)
        with tp.attach(model, language("fastv"), adapter=family.adapter) as handle:
            together, _ = greedy(model, batch, STEPS)
            (event,) = handle.trace
            for b, sample in enumerate(samples(family)):
                alone_inputs = family.inputs(model, [sample], b)
                alone, logits = greedy(model, alone_inputs, STEPS)
                assert torch.equal(kept_row(event, b) - pad[b], kept_row(handle.trace[0], 0))
                assert_same_greedy(together[b : b + 1], alone, logits)

    @torch.no_grad()
    @pytest.mark.parametrize("layer", [0, LAYER])
    def test_generate_with_the_cache_equals_recomputation(self, conformance_family, models, batch, layer):
        """Greedy decoding on the reduced cache equals the mask oracle recomputed without a cache."""
        model = models["sdpa"]
        strategy = "random" if layer == 0 else "fastv"
        config = language(strategy, layer)
        with tp.attach(model, config, adapter=conformance_family.adapter) as handle:
            tokens, _ = greedy(model, batch, STEPS)
            trace = handle.trace
        expected, logits = mask_oracle_greedy(conformance_family, model, batch, trace, STEPS, config)
        assert_same_greedy(tokens, expected, logits)

    @torch.no_grad()
    @pytest.mark.parametrize("layer", [0, LAYER])
    def test_decode_positions_equal_the_unreduced_run(self, conformance_family, models, batch, layer):
        """Under the `original` policy (random's), every decode step hands each decoder layer the
        positions (ids and rotary tables) of the unreduced run: a shorter cache never shifts them."""
        model = models["sdpa"]
        layers = tp.adapter_for(model, conformance_family.adapter).decoder_layers()
        watched = sorted({0, layer, len(layers) - 1})
        unreduced = self.decode_inputs(model, layers, watched, batch)
        with tp.attach(model, language("random", layer), adapter=conformance_family.adapter):
            reduced = self.decode_inputs(model, layers, watched, batch)
        for i in watched:
            for got, want in zip(reduced[i][1:], unreduced[i][1:], strict=True):
                if "position_ids" in want:
                    assert torch.equal(got["position_ids"], want["position_ids"])
                for a, b in zip(got["position_embeddings"], want["position_embeddings"], strict=True):
                    assert torch.equal(a, b)

    @staticmethod
    def decode_inputs(model: nn.Module, layers, watched: list[int], inputs: dict) -> dict[int, list[dict]]:
        """The keyword inputs of the watched layers at every forward of a greedy `generate`."""
        seen, handles = layer_kwargs(layers, watched)
        with hooked(handles):
            greedy(model, inputs, STEPS)
        return seen

    # -- the KV-cache site ---------------------------------------------------------------------------

    @torch.no_grad()
    def test_cache_site_equals_the_masked_decode(self, conformance_family, models, batch):
        """A `site: cache` stage (random, `cache()`): every step's logits equal the unreduced decode with
        the removed entries masked from layer 1 on, from their step on (<= 1e-4); a model whose caches
        keep windows of their own refuses it."""
        model = models["sdpa"]
        if has_local_rules(model.config.get_text_config()):
            with pytest.raises(tp.AttachError, match="site: cache"):
                tp.attach(model, cache("random"), adapter=conformance_family.adapter)
            return
        self.assert_cache_oracle(conformance_family, model, batch, cache("random"))

    @staticmethod
    def assert_cache_oracle(family: Family, model: nn.Module, inputs: dict, config: tp.ReductionConfig):
        """A selection before every decode step, and every step's logits equal the cache oracle's."""
        with tp.attach(model, config, adapter=family.adapter) as handle:
            _, logits, _ = cache_generate(model, inputs, STEPS)
            trace = list(handle.trace)
        assert [event.step for event in trace if event.site == "cache"] == list(range(1, STEPS))
        _, expected, _ = cache_oracle_run(model, inputs, trace, family.adapter, steps=STEPS)
        assert_steps_match(logits, expected)


    @torch.no_grad()
    def test_detach_leaves_nothing(self, conformance_family, models, batch):
        """After attach, forward, generate and detach: the same hooks, attributes and methods on every
        module, bit-exact weights and buffers, and bit-exact outputs."""
        model = models["sdpa"]
        before, logits = module_state(model), forward(conformance_family, model, batch)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        generation = model.generation_config.to_dict()
        handle = tp.attach(model, language("fastv"), adapter=conformance_family.adapter)
        forward(conformance_family, model, batch)
        greedy(model, batch, STEPS)
        handle.detach()
        assert module_state(model) == before
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert model.generation_config.to_dict() == generation
        assert torch.equal(forward(conformance_family, model, batch), logits)

    # -- every installed strategy at every site it acts at ---------------------------------------

    @torch.no_grad()
    @pytest.mark.parametrize(("strategy", "site"), strategy_sites())
    def test_every_strategy_runs_exactly_or_is_refused(
        self, conformance_family, models, batch, strategy, site
    ):
        """It runs and its oracle holds (mask oracle for pruning, merge oracle for merging, the tower
        mask oracle in a vision tower, the cache equal to recomputation; at a `site: cache` stage the
        cache oracle, `assert_cache_oracle`), or attaching (or the first
        forward) refuses it with a TokenPruneError saying why."""
        model, family = models["sdpa"], conformance_family
        config = at_site(strategy, site)
        try:
            handle = tp.attach(model, config, adapter=family.adapter)
        except tp.TokenPruneError as refusal:
            assert len(str(refusal)) > 20, f"a refusal must say why: {refusal!r}"
            return
        if site == "cache":
            handle.detach()
            self.assert_cache_oracle(family, model, batch, config)
            return
        with handle:
            towers = handle.adapter.vision_towers() if site == "vision" else ()
            with tower_runs(towers) as order, merges_returned(handle.reducer) as merges:
                try:
                    logits = forward(family, model, batch)
                except tp.TokenPruneError as refusal:
                    assert len(str(refusal)) > 20, f"a refusal must say why: {refusal!r}"
                    return
            trace = handle.trace
            merged = any(event.site == "vision" or event.sizes is not None for event in trace)
            if merged:
                cached, _ = greedy(model, batch, STEPS)
        expected = self.oracle(family, model, batch, trace, config, merges, towers, order)
        if merged and self.plain_language_merge(trace, merges):
            expected_tokens = merge_oracle_greedy(
                family, model, batch, trace[0], merges[0].proportional_attention, STEPS, config
            )
            assert torch.equal(cached, expected_tokens)
        elif merged:  # choices made on the media alone, which recomputing makes again: the cache's oracle
            with tp.attach(model, config, adapter=family.adapter):
                assert torch.equal(cached, recomputed_greedy(family, model, batch, STEPS))
        if expected is not None:
            assert_kept_logits_match(logits, expected, trace[-1].kept, LOGIT_TOL)

    @staticmethod
    def plain_language_merge(trace: Sequence[ReductionEvent], merges: Sequence[tp.Merge]) -> bool:
        """One language-model merge stage of plain size-weighted averages: what the merge oracle replays."""
        plain = all(merge.combine == "average" and merge.weights is None for merge in merges)
        return bool(merges) and plain and [event.site for event in trace] == ["language"]

    @staticmethod
    def oracle(family, model, inputs, trace, config, merges, towers, order) -> Tensor | None:
        """The logits the run must match: the merge oracle for a language merge of plain averages, the
        mask oracle (with the vision towers' own masks) for pruning; None for merges inside a vision
        tower or with weights or another combination, held to the cache-equals-recomputation check."""
        if merges:
            if not AdapterConformance.plain_language_merge(trace, merges):
                return None
            proportional = merges[0].proportional_attention
            return merge_oracle_logits(family, model, inputs, trace[0], proportional, config)
        vision_events = [event for event in trace if event.site == "vision"]
        handles = [
            h
            for k, event in zip(order, vision_events, strict=True)
            for h in tower_oracle_hooks(towers[k].layers, event)
        ]
        handles += mask_oracle_hooks(family, model, inputs, trace, inputs["input_ids"].shape[1], config)
        with hooked(handles):
            return forward(family, model, inputs)
