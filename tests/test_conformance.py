"""The adapter conformance suite of `tokenprune.testing`, run over every registered family.

A family registered under the entry-point group `tokenprune.families` (built-in or installed) gets
every check of `AdapterConformance`: the mask oracle, ratio-0 identity, batch equal to alone, the
cache equal to recomputation, decode positions, detach, and every installed strategy at every site.
The example plug-in package runs the same suite from its own tests, against its own adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_plugins import PACKAGE, installed_plugin  # noqa: F401 - the fixture installing the example
from torch import Tensor, nn

import tokenprune as tp
from tokenprune.testing.exactness import forward, mask_oracle_logits, merge_oracle_logits
from tokenprune.testing.families import FAMILIES, get_family, list_families, register_family
from tokenprune.testing.family import Family
from tokenprune.testing.oracles import assert_kept_logits_match
from tokenprune.testing.suite import LAYER, AdapterConformance, module_state, samples


class TestRegisteredFamilies(AdapterConformance):
    @pytest.fixture(scope="class", params=list_families())
    @classmethod
    def conformance_family(cls, request: pytest.FixtureRequest) -> Family:
        return get_family(request.param)


@pytest.mark.usefixtures("installed_plugin")
def test_the_example_plugin_package_passes_the_suite_in_its_own_tests() -> None:
    """examples/plugin-package runs `AdapterConformance` against its own adapter, from its own tests."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=PACKAGE,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


# -- the kit itself: the registry, and oracles that tell a wrong run from a right one ---------------------


def test_an_unknown_family_is_an_error_listing_the_known_ones() -> None:
    with pytest.raises(tp.UnknownNameError, match=r"Did you mean 'llava'\?.*Known families: .*llava"):
        get_family("lava")


def test_only_a_family_can_be_registered() -> None:
    with pytest.raises(tp.PluginError, match=r"not a tokenprune\.testing\.Family"):
        register_family("not_a_family")(object())
    register_family("llava_again")(get_family("llava"))
    try:
        assert "llava_again" in list_families("llava*")
        assert get_family("llava_again") is get_family("llava")
    finally:
        FAMILIES.unregister("llava_again")


@pytest.fixture(scope="module")
def llava() -> tuple[Family, nn.Module, dict[str, Tensor]]:
    family = get_family("llava")
    model = family.model("sdpa")
    return family, model, family.inputs(model, samples(family), 0)


@torch.no_grad()
def test_the_mask_oracle_tells_a_wrong_selection(llava) -> None:
    """Keeping other tokens than the trace says moves the kept logits far beyond the tolerance."""
    family, model, inputs = llava
    with tp.attach(model, tp.ReductionConfig(strategy="random", layer=LAYER, ratio=0.5)) as handle:
        logits = forward(family, model, inputs)
        (event,) = handle.trace
    other = tp.ReductionConfig(strategy="random", layer=LAYER, ratio=0.5, params={"seed": 7})
    with tp.attach(model, other) as handle:
        forward(family, model, inputs)
        wrong = handle.trace
    assert not torch.equal(wrong[0].kept, event.kept)
    expected = mask_oracle_logits(family, model, inputs, wrong)
    with pytest.raises(AssertionError):
        assert_kept_logits_match(logits, expected, event.kept, 1e-3)


@torch.no_grad()
def test_the_merge_oracle_averages_and_weights_by_size(llava) -> None:
    """A merging run matches the merge oracle, and neither plain masking nor merging without
    proportional attention."""
    family, model, inputs = llava
    with tp.attach(model, tp.ReductionConfig(strategy="tome", layer=LAYER, ratio=0.5)) as handle:
        logits = forward(family, model, inputs)
        (event,) = handle.trace
    assert_kept_logits_match(logits, merge_oracle_logits(family, model, inputs, event, True), event.kept)
    for wrong in (
        mask_oracle_logits(family, model, inputs, [event]),
        merge_oracle_logits(family, model, inputs, event, False),
    ):
        with pytest.raises(AssertionError):
            assert_kept_logits_match(logits, wrong, event.kept, 1e-3)


def test_the_detach_check_sees_a_hook_left_behind(llava) -> None:
    _, model, _ = llava
    before = module_state(model)
    handle = model.model.language_model.layers[1].register_forward_pre_hook(lambda module, args: None)
    try:
        assert module_state(model) != before
    finally:
        handle.remove()
    assert module_state(model) == before
