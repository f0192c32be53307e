"""vLLM + tokenprune-vllm == transformers + `tp.attach`, token for token, on a tiny LLaVA (fp32, greedy)."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from engine import Request, image, one_stage, run_engine, written
from engine import assert_vllm_equals_hf as parity
from hf import expanded, greedy_continuation
from pydantic import ValidationError
from tokenprune_vllm.llava import PrunedLlavaForConditionalGeneration
from tokenprune_vllm.reduction import CONFIG_ENV, active_reduction, checked_reduction, load_reduction
from transformers import CLIPImageProcessor

import tokenprune as tp
from tokenprune.errors import ConfigError, TokenPruneError
from tokenprune.testing.models import IMAGE_TOKEN_ID

MAX_TOKENS = 8
SINGLE = [Request([1, 17, IMAGE_TOKEN_ID, 40, 41, 42], [0])]
BATCH = [  # different images, prompts and lengths, the image at different places
    Request([1, 17, IMAGE_TOKEN_ID, 40, 41, 42], [1]),
    Request([1, IMAGE_TOKEN_ID, 90, 91], [2]),
    Request([1, 20, 21, 22, 23, IMAGE_TOKEN_ID, 55, 56, 57, 58, 59], [3]),
]
# every strategy vLLM can run, once (an engine start each, ~100 s on a loaded 2-core machine), with a budget
# of its own; each site is exercised by seven or more (feature-only, seeded, grid, attention-ranked ones);
# the test below checks that the registry's other (strategy, site) pairs are these strategies elsewhere
SITES = {"layer0": {"layer": 0}, "vision": {"layer": 0, "site": "vision"}}
SERVED = {
    ("uniform", "layer0"): {"keep": 9},
    ("pool", "layer0"): {"keep": 9},
    ("downsample", "layer0"): {"keep": 12},
    ("prunevid", "layer0"): {"keep": 9},  # video methods: an image is one frame
    ("evs", "layer0"): {"keep": 9},
    ("vidcom2", "layer0"): {"keep": 9},
    ("fastvid", "layer0"): {"keep": 9},
    ("holitom", "layer0"): {"keep": 9},
    ("divprune", "vision"): {"keep": 9},
    ("random", "vision"): {"ratio": 0.5, "params": {"seed": 3}},
    ("fastervlm", "vision"): {"keep": 9},
    ("visionzip", "vision"): {"keep": 12},
    ("vispruner", "vision"): {"keep": 9},
    ("hiprune", "vision"): {"keep": 9},
    ("fastv", "vision"): {"keep": 9},  # ranks by the class token's attention in the tower
}


def reduction(strategy: str, site: str, budget: dict[str, Any]) -> dict[str, Any]:
    """A one-stage config at `site` (vLLM numbers the shortened prompt: `renumbered`)."""
    return one_stage(strategy, SITES[site], budget)


def hf_greedy(model, folder: Path, request: Request, config: dict[str, Any] | None) -> list[int]:
    """transformers' greedy continuation of `request`, under `tp.attach(config)` unless None."""
    pixels = CLIPImageProcessor.from_pretrained(folder)(
        [image(s) for s in request.images], return_tensors="pt"
    )
    per_image = model.config.vision_config.image_size // model.config.vision_config.patch_size
    input_ids = expanded(request.prompt, [per_image**2] * len(request.images))
    return greedy_continuation(model, input_ids, config, MAX_TOKENS, pixel_values=pixels.pixel_values)


def assert_vllm_equals_hf(llava, tmp_path: Path, config: dict[str, Any] | None) -> None:
    """Single requests and a batch of different ones: vLLM's tokens == HF's, request by request."""
    folder, model = llava
    greedy = partial(hf_greedy, model, folder, config=config)
    parity(folder, [SINGLE, BATCH], MAX_TOKENS, config, tmp_path, greedy)


def test_unreduced_vllm_equals_unreduced_hf(llava, tmp_path: Path) -> None:
    assert_vllm_equals_hf(llava, tmp_path, None)


@pytest.mark.parametrize(("strategy", "site"), sorted(SERVED))
def test_reduced_vllm_equals_hf_attach(llava, tmp_path: Path, strategy: str, site: str) -> None:
    assert_vllm_equals_hf(llava, tmp_path, reduction(strategy, site, SERVED[strategy, site]))


def test_every_pre_llm_strategy_is_served_and_tested() -> None:
    """Every registered strategy vLLM accepts has a parity test (SERVED) at a site where it is accepted."""
    accepted = set()
    for name in tp.list_strategies():
        for site in SITES:
            try:
                checked_reduction(tp.ReductionConfig(**reduction(name, site, {"keep": 9})))
            except (TokenPruneError, ValidationError):
                continue
            accepted.add((name, site))
    assert set(SERVED) <= accepted
    assert {name for name, _ in accepted} == {name for name, _ in SERVED}
    assert {site for _, site in SERVED} == set(SITES)


# each refusal comes from `load_reduction`, which the plug-in's `register` runs first in every vLLM process
REFUSED = [
    (
        {"strategy": "fastv", "layer": 2, "ratio": 0.5, "positions": "renumbered"},
        "only reductions before the language model",
    ),
    ({"strategy": "cdpruner", "layer": 0, "keep": 9}, "depends on the prompt's text"),
    (
        {
            "strategy": "visionzip",
            "stages": [{"layer": 0, "site": "vision", "keep": 12}],
            "params": {"proportional_attention": True},
        },
        "proportional attention",
    ),
    (
        {"strategy": "divprune", "stages": [{"layer": 0, "keep": 20}, {"layer": 2, "keep": 9}]},
        "one stage",
    ),
]


@pytest.mark.parametrize(("config", "reason"), REFUSED)
def test_invalid_configs_are_refused_when_the_plugin_loads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], reason: str
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(written(tmp_path, config)))
    with pytest.raises(TokenPruneError, match=re.escape(reason)):
        load_reduction()


def test_a_refused_config_stops_the_engine_at_start(llava, tmp_path: Path) -> None:
    """The refusal reaches whoever starts vLLM: the engine exits before serving, saying why."""
    config, reason = REFUSED[0]
    done = run_engine(llava[0], [SINGLE], MAX_TOKENS, written(tmp_path, config), tmp_path)
    assert done.returncode != 0
    assert reason in done.stderr


def test_llava_refuses_original_positions_when_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`positions: original` (random's default) passes the config check, as Qwen2-VL's M-RoPE serves it,
    and stops LLaVA's class when the engine builds it, naming the family: vLLM numbers 1-D positions."""
    config = {"strategy": "random", "layer": 0, "keep": 9}
    monkeypatch.setenv(CONFIG_ENV, str(written(tmp_path, config)))
    assert load_reduction().positions == "original"
    active_reduction.cache_clear()
    try:
        with pytest.raises(ConfigError, match=re.escape("cannot serve LLaVA with `positions: original`")):
            PrunedLlavaForConditionalGeneration(vllm_config=None)
    finally:
        active_reduction.cache_clear()
