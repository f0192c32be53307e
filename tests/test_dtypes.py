"""Half precision: every adapter runs FastV, ToMe and DivPrune in bfloat16 and float16 on CPU.

For each adapter x strategy x dtype, the seeded toy model cast with `.to(dtype)`:
- prefill and `generate` run under the attachment (no dtype error);
- every float mask the layers from the site on receive (prefill and decode; eager masks, ToMe's
  key biases) is in the compute dtype;
- what the strategy ranks or compares (FastV's scores, ToMe's key metric, DivPrune's features) is
  float32, whatever the model's dtype;
- on inputs built so that the ranking has clear gaps, the kept positions equal the float32 run's,
  which keeps exactly the tokens the construction singles out (checked first, in float32).

The constructions (`Planted`) replace the visual rows of the language model's input embeddings:
- FastV (layer 1): layer 0's queries and keys read one input feature, in the lowest rotary
  frequency (no distance decay); the singled-out tokens and the last token carry it, the others do
  not: those tokens receive several logits more attention than the rest.
- ToMe (layer 1): random vectors, with pairs of neighbours (one in set A, one in set B) made
  near-identical: exactly the A tokens of the pairs find a match of cosine ~1, the rest < 0.9.
- DivPrune (layer 0): the singled-out tokens are orthonormal, the others near one vector at cosine
  1/sqrt(k) of each: greedy max-min picks the k orthonormal ones with a gap of 1 - 1/sqrt(k).
The families of the conformance kit (Gemma 3, InternVL, LLaVA-OneVision, Qwen3-VL) join through their
`Family` factories; Gemma 3 runs DivPrune with `positions: original`, as it refuses renumbering.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from test_llava_next import next_inputs
from test_video_llava import media_inputs
from tokenprune.strategies import divprune, tome
from tokenprune.strategies.fastv import FastV
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.config import Stage
from tokenprune.registry import ADAPTERS, adapter_for
from tokenprune.testing.families import gemma3, internvl, llava_onevision, qwen3_vl
from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import toy_llava, toy_llava_next, toy_qwen2_5_vl, toy_qwen2_vl, toy_video_llava
from tokenprune.testing.oracles import Prompt, class_token_view, generation_positions, hooked, llava_inputs
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

STEPS = 3
FEATURE_SCALE = 0.3  # FastV: layer 0's q and k read input feature 0 with this weight (logit gap ~5)


def cpu_refusal(dtype: torch.dtype) -> str | None:
    """Why this CPU cannot run matmuls and SDPA in `dtype`, or None when it can."""
    x = torch.ones(1, 2, 4, 8, dtype=dtype)
    try:
        torch.nn.functional.scaled_dot_product_attention(x, x, x)
        torch.nn.functional.linear(x, torch.ones(8, 8, dtype=dtype))
    except RuntimeError as error:
        return f"this CPU build has no {dtype} matmul/SDPA: {error}"
    return None


def dtype_param(dtype: torch.dtype):
    """`dtype` as a test parameter, skipped with the reason where this CPU cannot compute in it."""
    refusal = cpu_refusal(dtype)
    skip = pytest.mark.skipif(refusal is not None, reason=refusal or "")
    return pytest.param(dtype, id=str(dtype).removeprefix("torch."), marks=skip)


DTYPES = [dtype_param(torch.bfloat16), dtype_param(torch.float16)]


def llava_batch(model: nn.Module) -> dict[str, Tensor]:
    return llava_inputs([Prompt([3, 4], 1), Prompt([1, 2, 5], 2)])


def llava_next_batch(model: nn.Module) -> dict[str, Tensor]:
    return next_inputs(model, [Prompt([3, 2], 1), Prompt([1, 2], 1)], [(24, 40), (30, 24)])


def qwen_batch(model: nn.Module) -> dict[str, Tensor]:
    prompts = [
        QwenPrompt([3, 2], [Item((1, 8, 8))]),
        QwenPrompt([1, 2, 2], [Item((1, 8, 12)), Item((1, 4, 8))]),
    ]
    return qwen_inputs(model, prompts)


def video_llava_batch(model: nn.Module) -> dict[str, Tensor]:
    return media_inputs([[2, "image", 3], [1, "video", 2]], frames=2)


ModelCase = tuple[Callable[[], nn.Module], Callable[[nn.Module], dict[str, Tensor]]]  # toy model, its batch


def conformance_case(family: Family) -> ModelCase:
    """A conformance-kit family's SDPA toy model and its batch of a one-item and a two-item sample."""
    samples = [Sample((3, 2), 1), Sample((1, 2, 2), 2)]
    return (lambda: family.model("sdpa")), (lambda model: family.inputs(model, samples, 0))


# adapter (and attention, where it changes the masks' format) -> (toy model, its batch of two samples)
MODELS: dict[str, ModelCase] = {
    "gemma3": conformance_case(gemma3.FAMILY),
    "internvl": conformance_case(internvl.FAMILY),
    "llava_onevision": conformance_case(llava_onevision.FAMILY),
    "qwen3_vl": conformance_case(qwen3_vl.FAMILY),
    "llava": (toy_llava, llava_batch),
    "llava_eager": (lambda: toy_llava(attn_implementation="eager"), llava_batch),
    "llava_next": (toy_llava_next, llava_next_batch),
    "qwen2_vl": (toy_qwen2_vl, qwen_batch),
    "qwen2_5_vl": (toy_qwen2_5_vl, qwen_batch),
    "video_llava": (toy_video_llava, video_llava_batch),
}


@dataclass(frozen=True)
class Planted:
    """Rows to write over the language model's input embeddings, and the kept positions they force."""

    rows: Tensor  # [B, N, D] float32
    where: Tensor  # [B, N] bool: the rows replaced
    kept: list[list[int]]  # per sample: the positions (text and visual) a float32 run must keep


def candidates_of(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """[B, N] bool: the visual tokens of the batch, as the adapter lays them out (real tokens only)."""
    layout = adapter_for(model).visual_layout(inputs)
    return layout.visual & inputs["attention_mask"].bool()


def kept_positions(inputs: dict[str, Tensor], candidates: Tensor, removed: Tensor) -> list[list[int]]:
    """Per sample, the real positions that are not `removed` candidates."""
    real = inputs["attention_mask"].bool() & ~(candidates & removed)
    return [row.nonzero().squeeze(1).tolist() for row in real]


def plant_fastv(model: nn.Module, inputs: dict[str, Tensor], stage: Stage) -> Planted:
    """k tokens per sample (and the last token) carry feature 0, the other visual tokens none."""
    candidates = candidates_of(model, inputs)
    gen = torch.Generator().manual_seed(0)
    rows = 0.02 * torch.randn(*candidates.shape, hidden_width(model), generator=gen)
    chosen = torch.zeros_like(candidates)
    for b, row in enumerate(candidates):
        members = row.nonzero().squeeze(1)
        k = stage.kept_count(len(members))
        chosen[b, members[torch.randperm(len(members), generator=gen)[:k]]] = True
    chosen[:, -1] = True  # the query of FastV's scores: the last token (left padding)
    rows[..., 0] = chosen.float()
    return Planted(rows, candidates | chosen, kept_positions(inputs, candidates, ~chosen))


def plant_tome(model: nn.Module, inputs: dict[str, Tensor], stage: Stage) -> Planted:
    """Random rows; in each sample, n - k disjoint pairs of neighbouring visual tokens made near-equal."""
    candidates = candidates_of(model, inputs)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(*candidates.shape, hidden_width(model), generator=gen)
    rank = inputs["attention_mask"].cumsum(dim=1) - 1  # ToMe's sets: A at even ranks among real tokens
    merged = torch.zeros_like(candidates)
    for b, row in enumerate(candidates):
        members = row.nonzero().squeeze(1).tolist()
        pairs = [(p, p + 1) for p in members[::2] if p + 1 in members]
        r = len(members) - stage.kept_count(len(members))
        assert len(pairs) >= r, "the construction needs a pair per merge"
        for i in torch.randperm(len(pairs), generator=gen)[:r].tolist():
            first, second = pairs[i]
            rows[b, second] = rows[b, first] + 1e-3 * torch.randn(rows.shape[-1], generator=gen)
            merged[b, first if rank[b, first] % 2 == 0 else second] = True
    return Planted(rows, candidates, kept_positions(inputs, candidates, merged))


def plant_divprune(model: nn.Module, inputs: dict[str, Tensor], stage: Stage) -> Planted:
    """k orthonormal rows per sample, the other visual rows near their normalised sum."""
    candidates = candidates_of(model, inputs)
    width = hidden_width(model)
    gen = torch.Generator().manual_seed(0)
    rows = torch.zeros(*candidates.shape, width)
    chosen = torch.zeros_like(candidates)
    for b, row in enumerate(candidates):
        members = row.nonzero().squeeze(1)
        k = stage.kept_count(len(members))
        assert k < width, "the construction needs k orthonormal rows"
        basis = torch.linalg.qr(torch.randn(width, k, generator=gen)).Q.T  # [k, D] orthonormal
        picked = members[torch.randperm(len(members), generator=gen)[:k]]
        rows[b, members] = basis.sum(0) / k**0.5 + 1e-3 * torch.randn(len(members), width, generator=gen)
        rows[b, picked] = basis
        chosen[b, picked] = True
    return Planted(rows, candidates, kept_positions(inputs, candidates, candidates & ~chosen))


def hidden_width(model: nn.Module) -> int:
    return adapter_for(model).text_config().hidden_size


def salient_feature_attention(model: nn.Module) -> nn.Module:
    """Layer 0's queries and keys read input feature 0 alone, in each head's lowest rotary frequency."""
    attention = adapter_for(model).decoder_layers()[0].self_attn
    with torch.no_grad():
        for projection in (attention.q_proj, attention.k_proj):
            projection.weight.zero_()
            projection.weight[attention.head_dim - 1 :: attention.head_dim, 0] = FEATURE_SCALE
            if projection.bias is not None:
                projection.bias.zero_()
    return model


@dataclass(frozen=True)
class Case:
    """A strategy, the stage it runs, the construction separating its ranking, and the function it
    computes its ranking with (module, attribute, which argument or the result) for the float32 spy."""

    config: tp.ReductionConfig
    plant: Callable[[nn.Module, dict[str, Tensor], Stage], Planted]
    spied: tuple[object, str, int | None]
    prepare: Callable[[nn.Module], nn.Module] = lambda model: model


CASES = {
    "fastv": Case(
        tp.ReductionConfig(strategy="fastv", layer=1, ratio=0.75),
        plant_fastv,
        (FastV, "score", None),
        salient_feature_attention,
    ),
    "tome": Case(
        tp.ReductionConfig(strategy="tome", layer=1, ratio=0.25), plant_tome, (tome, "best_matches", 0)
    ),
    "divprune": Case(
        tp.ReductionConfig(strategy="divprune", layer=0, ratio=0.75),
        plant_divprune,
        (divprune, "max_min_picks", 0),
    ),
}


ORIGINAL_POSITIONS_ONLY = {"gemma3"}  # adapters refusing `positions: renumbered` (Gemma 3: two rotary tables)


def config_for(case: Case, family: str) -> tp.ReductionConfig:
    """The case's config, with `positions: original` on a family that refuses renumbering."""
    if family not in ORIGINAL_POSITIONS_ONLY:
        return case.config
    return case.config.model_copy(update={"positions": "original"})


def planting_hook(model: nn.Module, planted: Planted) -> list:
    """A pre-hook on the language model writing the planted rows over a prefill's input embeddings."""
    language_model = adapter_for(model).base_model().language_model

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[:2] != planted.where.shape:
            return None  # a decode step: nothing to plant
        where = planted.where[..., None]
        return args, {**kwargs, "inputs_embeds": torch.where(where, planted.rows.to(embeds.dtype), embeds)}

    return [language_model.register_forward_pre_hook(hook, with_kwargs=True)]


def mask_recorder(model: nn.Module, first: int, seen: list[Tensor]) -> list:
    """Pre-hooks on the decoder layers from `first` on, keeping every float mask they receive."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.is_floating_point():
            seen.append(mask)

    return [
        layer.register_forward_pre_hook(hook, with_kwargs=True)
        for layer in adapter_for(model).decoder_layers()[first:]
    ]


def spy(
    monkeypatch: pytest.MonkeyPatch, target: tuple[object, str, int | None], dtypes: list[torch.dtype]
) -> None:
    """Record the dtype of the spied function's argument (or result, for None) at every call."""
    owner, name, argument = target
    original = getattr(owner, name)

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        dtypes.append((result if argument is None else args[argument]).dtype)
        return result

    monkeypatch.setattr(owner, name, recording)


def reduced_run(
    model: nn.Module,
    config: tp.ReductionConfig,
    inputs: dict[str, Tensor],
    planted: Planted,
    masks: list[Tensor],
    steps: int = 0,
) -> list[list[int]]:
    """Kept positions of a planted prefill under `config`; then `steps` greedy tokens of `generate`."""
    first = config.stages[0].layer
    with (  # the recorder goes on after the attachment: its hooks see the masks tokenprune hands on
        hooked(planting_hook(model, planted)),
        tp.attach(model, config) as handle,
        hooked(mask_recorder(model, first, masks)),
        torch.no_grad(),
    ):
        model(**inputs, position_ids=generation_positions(inputs["attention_mask"]), use_cache=False)
        kept = [row[row >= 0].tolist() for row in handle.trace[-1].kept]
        if steps:
            out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            assert out.shape[1] == inputs["input_ids"].shape[1] + steps
    return kept


@functools.cache
def float32_selection(family: str, strategy: str) -> tuple[nn.Module, dict[str, Tensor], Planted]:
    """The seeded float32 model prepared for `strategy`, its batch and the construction, checked once:
    a float32 prefill keeps exactly the positions the construction singles out."""
    build, batch = MODELS[family]
    case = CASES[strategy]
    model = case.prepare(build())
    inputs = batch(model)
    planted = case.plant(model, inputs, case.config.stages[0])
    kept = reduced_run(model, config_for(case, family), inputs, planted, [])
    assert kept == planted.kept, "the construction must single out the kept tokens in float32"
    return model, inputs, planted


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", list(CASES))
@pytest.mark.parametrize("family", list(MODELS))
def test_half_precision_keeps_the_float32_selection(monkeypatch, family, strategy, dtype):
    reference, inputs, planted = float32_selection(family, strategy)
    case = CASES[strategy]
    ranked_in: list[torch.dtype] = []
    spy(monkeypatch, case.spied, ranked_in)
    half = copy.deepcopy(reference).to(dtype)
    masks: list[Tensor] = []
    assert reduced_run(half, config_for(case, family), inputs, planted, masks, steps=STEPS) == planted.kept
    assert ranked_in and set(ranked_in) == {torch.float32}
    assert {mask.dtype for mask in masks} <= {dtype}
    eager = adapter_for(half).text_config()._attn_implementation == "eager"
    if eager or strategy == "tome":  # eager masks, or ToMe's key bias under SDPA: float masks
        assert masks, "float masks were expected at the layers from the site on"


def test_signals_and_features_reach_strategies_in_float32():
    """The contract casts once, whatever a (plug-in) provider computes in: strategies never cast."""
    half_keys = torch.randn(2, 5, 4).to(torch.bfloat16)
    view = class_token_view(2, (2, 2), 2, {"keys": lambda: half_keys})
    view.hidden = view.hidden.to(torch.bfloat16)
    assert view.signals.keys().dtype == torch.float32
    assert torch.equal(view.signals.keys(), half_keys.float())
    assert view.features().dtype == torch.float32 and view.hidden.dtype == torch.bfloat16
    assert view.features() is view.features()  # cast once per view


def test_every_shipped_language_adapter_is_in_the_half_precision_suite():
    """A new adapter in `adapters/` cannot slip past the suite above: its toy model must join MODELS."""
    classes = {name: ADAPTERS.get(name) for name in tp.list_adapters()}
    shipped = {
        name
        for name, cls in classes.items()
        if issubclass(cls, tp.Adapter) and cls.__module__.startswith("tokenprune.adapters")
    }
    covered = {adapter_for(build()).name for build, _ in MODELS.values()}
    assert shipped <= covered, f"adapters without a half-precision case: {sorted(shipped - covered)}"
