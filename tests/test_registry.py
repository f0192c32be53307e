"""Strategy and adapter registries: names, wildcards, duplicates, broken plug-ins, in-process registration.

Installed plug-ins are simulated with fake entry points (`entrypoints.get_group_all` patched) or,
for the one check that needs a fresh interpreter, with a fake `*.dist-info` on PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import entrypoints
import pydantic
import pytest
from torch import nn

import tokenprune as tp
from tokenprune.registry import ADAPTERS, STRATEGIES, Registry

BROKEN_MODULE = "tp_test_broken_plugin"
GROUPS = {"strategy": "tokenprune.strategies", "adapter": "tokenprune.adapters"}


@pytest.fixture(autouse=True)
def fresh_registries():
    """Rediscover and reload plug-ins in every test; afterwards, drop whatever a test registered or loaded."""
    saved = [(r, dict(r._registered), dict(r._loaded)) for r in (STRATEGIES, ADAPTERS)]
    for registry, _, _ in saved:
        registry._discovered = None
        registry._loaded = {}  # classes loaded earlier would hide the entry points a test declares
    yield
    for registry, registered, loaded in saved:
        registry._registered = registered
        registry._loaded = loaded
        registry._discovered = None


def _entry_point(name: str, target: str, distribution: str) -> entrypoints.EntryPoint:
    module, obj = target.split(":")
    return entrypoints.EntryPoint(name, module, obj, distro=entrypoints.Distribution(distribution, "1.0"))


@pytest.fixture
def declare(monkeypatch: pytest.MonkeyPatch):
    """declare(group, entry_point, ...): make these entry points look installed, next to the real ones."""
    extra: dict[str, list[entrypoints.EntryPoint]] = {}
    real = entrypoints.get_group_all

    def get_group_all(group: str, path: list[str] | None = None) -> list[entrypoints.EntryPoint]:
        return [*real(group, path), *extra.get(group, [])]

    monkeypatch.setattr(entrypoints, "get_group_all", get_group_all)

    def add(group: str, *eps: entrypoints.EntryPoint) -> None:
        extra.setdefault(group, []).extend(eps)
        STRATEGIES._discovered = ADAPTERS._discovered = None

    return add


@pytest.fixture
def broken_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module name whose import raises ImportError (a plug-in missing a dependency)."""
    (tmp_path / f"{BROKEN_MODULE}.py").write_text('raise ImportError("needs the package `missing_lib`")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    return BROKEN_MODULE


@pytest.fixture
def toy(llava_sdpa: nn.Module) -> nn.Module:
    return llava_sdpa


# -- names ---------------------------------------------------------------------------------


def test_built_in_subpackages_are_importable_beside_the_listing_functions(toy: nn.Module) -> None:
    """`tokenprune.strategies` / `tokenprune.adapters` are the subpackages holding the built-ins (users
    subclass them); the listings are `tp.list_strategies` / `tp.list_adapters`, timm's convention."""
    import tokenprune.adapters.llava
    import tokenprune.strategies.fastv

    assert tp.strategy_class("fastv") is tokenprune.strategies.fastv.FastV
    assert type(tp.adapter_for(toy, "llava")) is tokenprune.adapters.llava.LlavaAdapter
    assert tp.strategies is tokenprune.strategies and tp.adapters is tokenprune.adapters
    assert "fastv" in tp.list_strategies("fast*")
    assert tp.list_adapters("llava*") == ["llava", "llava_next", "llava_onevision"]


def test_unknown_name_lists_known_names_and_suggests_the_closest(declare) -> None:
    registry = Registry("strategy", "tokenprune.test_group", tp.Reducer)
    declare(
        "tokenprune.test_group",
        _entry_point("fastv", "somewhere:FastV", "pkg"),
        _entry_point("random", "somewhere:Random", "pkg"),
    )
    with pytest.raises(tp.UnknownNameError) as caught:
        registry.get("fastvv")
    assert str(caught.value) == (
        "unknown strategy 'fastvv'. Did you mean 'fastv'? Known strategies: fastv, random"
    )
    with pytest.raises(tp.UnknownNameError) as caught:
        registry.get("zzzzzz")
    assert str(caught.value) == "unknown strategy 'zzzzzz'. Known strategies: fastv, random"
    adapters = Registry("adapter", "tokenprune.test_group", tp.Adapter)
    with pytest.raises(tp.UnknownNameError, match=r"Known adapters: fastv, random$"):
        adapters.get("zzzzzz")


def test_unknown_names_through_the_public_api(toy: nn.Module) -> None:
    with pytest.raises(tp.UnknownNameError, match="Did you mean 'fastv'") as caught:
        tp.strategy_class("fastvv")
    assert all(name in str(caught.value) for name in tp.list_strategies())
    with pytest.raises(pydantic.ValidationError, match="Did you mean 'uniform'"):
        tp.ReductionConfig(strategy="unifrom", layer=1, ratio=0.5)
    with pytest.raises(tp.UnknownNameError, match=r"unknown adapter 'lava'\. Did you mean 'llava'"):
        tp.attach(toy, tp.ReductionConfig(strategy="fastv", layer=1, ratio=0.5), adapter="lava")


def test_wildcards_filter_sorted_names(declare) -> None:
    assert "fastv" in tp.list_strategies("f*")
    assert all(name.startswith("f") for name in tp.list_strategies("f*"))
    assert tp.list_strategies("*") == tp.list_strategies() == sorted(tp.list_strategies())
    assert tp.list_strategies("no_such_strategy_*") == []
    assert "llava" in tp.list_adapters("llava*")
    registry = Registry("strategy", "tokenprune.test_group", tp.Reducer)
    declare(
        "tokenprune.test_group",
        *(_entry_point(name, f"somewhere:{name}", "pkg") for name in ["tome", "fastv", "fastv_mean", "dart"]),
    )
    assert registry.names("fast*") == ["fastv", "fastv_mean"]
    assert registry.names("*v") == ["fastv"]
    assert registry.names("?a*") == ["dart", "fastv", "fastv_mean"]
    assert "tome" in registry and "tom" not in registry


# -- plug-ins that clash or break ---------------------------------------------------------------


def test_a_name_declared_by_two_packages_fails_only_when_used(declare) -> None:
    declare(
        GROUPS["strategy"],
        _entry_point("twin", "pkg_one.twin:Twin", "tokenprune-plugin-one"),
        _entry_point("twin", "pkg_two.twin:Twin", "tokenprune-plugin-two"),
    )
    assert "twin" in tp.list_strategies()  # listing works
    assert tp.strategy_class("fastv") is not None  # other names work
    with pytest.raises(tp.PluginError) as caught:
        tp.strategy_class("twin")
    message = str(caught.value)
    for part in ["'twin'", "pkg_one.twin:Twin", "tokenprune-plugin-one", "pkg_two.twin:Twin"]:
        assert part in message
    assert "tokenprune-plugin-two" in message
    with pytest.raises(tp.PluginError, match="tokenprune-plugin-two"):  # not a pydantic field error
        tp.ReductionConfig(strategy="twin", layer=1, ratio=0.5)


def test_a_built_in_name_cannot_be_taken_by_a_plugin(declare) -> None:
    declare(GROUPS["strategy"], _entry_point("fastv", "evil_plugin:FastV", "tokenprune-evil"))
    with pytest.raises(tp.PluginError, match=r"tokenprune\.strategies\.fastv:FastV .*tokenprune-evil"):
        tp.strategy_class("fastv")


def test_the_same_class_declared_again_is_not_a_clash(declare) -> None:
    """One class seen twice (an editable and a regular install, say) is the same plug-in."""
    declare(GROUPS["strategy"], _entry_point("fastv", "tokenprune.strategies.fastv:FastV", "tokenprune-copy"))
    assert tp.strategy_class("fastv").__name__ == "FastV"


def test_a_clash_stays_a_clash_when_the_first_class_is_declared_again(declare) -> None:
    declare(
        GROUPS["strategy"],
        _entry_point("trio", "pkg_a:A", "dist-a"),
        _entry_point("trio", "pkg_b:B", "dist-b"),
        _entry_point("trio", "pkg_a:A", "dist-c"),
    )
    with pytest.raises(tp.PluginError, match=r"dist-a.*dist-b"):
        tp.strategy_class("trio")


def test_a_broken_plugin_breaks_only_its_own_name(declare, broken_module: str, tmp_path: Path) -> None:
    declare(GROUPS["strategy"], _entry_point("broken", f"{broken_module}:Broken", "tokenprune-broken"))
    assert "broken" in tp.list_strategies()
    with pytest.raises(tp.PluginError) as caught:
        tp.strategy_class("broken")
    message = str(caught.value)
    for part in ["'broken'", f"{broken_module}:Broken", "tokenprune-broken", "missing_lib"]:
        assert part in message
    assert isinstance(caught.value.__cause__, ImportError)
    with pytest.raises(tp.PluginError, match="missing_lib") as through_config:  # not a ValidationError
        tp.ReductionConfig(strategy="broken", layer=1, ratio=0.5)
    assert isinstance(through_config.value.__cause__, ImportError)
    broken = tmp_path / "broken.yaml"
    broken.write_text("strategy: broken\nlayer: 1\nratio: 0.5\n")
    with pytest.raises(tp.PluginError, match="missing_lib"):
        tp.load_config(broken)
    assert tp.ReductionConfig(strategy="fastv", layer=1, ratio=0.5).strategy == "fastv"


def test_plugins_are_imported_lazily_and_a_broken_one_does_not_break_import(tmp_path: Path) -> None:
    """A fresh interpreter with two installed plug-ins: one lazy, one whose import fails."""
    info = tmp_path / "fakeplugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[tokenprune.strategies]\n"
        f"broken = {BROKEN_MODULE}:Broken\n"
        "lazy = tp_test_lazy_plugin:Lazy\n"
        "[tokenprune.adapters]\n"
        f"broken_adapter = {BROKEN_MODULE}:BrokenAdapter\n"
    )
    (tmp_path / f"{BROKEN_MODULE}.py").write_text('raise ImportError("needs the package `missing_lib`")\n')
    (tmp_path / "tp_test_lazy_plugin.py").write_text(
        "from tokenprune.strategies.random import RandomSelection as Lazy\n"
    )
    script = textwrap.dedent(
        f"""
        import sys
        import tokenprune as tp
        names = tp.list_strategies()
        assert {{"broken", "lazy", "fastv"}} <= set(names), names
        assert "broken_adapter" in tp.list_adapters(), tp.list_adapters()
        assert "tp_test_lazy_plugin" not in sys.modules, "listing names imported a plug-in"
        try:
            tp.strategy_class("broken")
        except tp.PluginError as exc:
            assert "{BROKEN_MODULE}:Broken" in str(exc) and "fakeplugins" in str(exc), exc
        else:
            raise AssertionError("a broken plug-in loaded")
        assert tp.strategy_class("lazy").__name__ == "RandomSelection"
        assert "tp_test_lazy_plugin" in sys.modules
        from tokenprune.testing.models import toy_llava
        assert type(tp.adapter_for(toy_llava())).__name__ == "LlavaAdapter"
        print("ok")
        """
    )
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


# -- in-process registration ---------------------------------------------------------------


def test_register_strategy_decorator(toy: nn.Module) -> None:
    @tp.register_strategy("test_keep_first")
    class KeepFirst(tp.Reducer):
        def select(self, view: tp.TokenView):
            rank = view.candidates.long().cumsum(dim=1)
            return view.candidates & (rank <= view.budget[:, None])

    try:
        assert "test_keep_first" in tp.list_strategies("test_*")
        assert tp.strategy_class("test_keep_first") is KeepFirst
        assert tp.register_strategy("test_keep_first")(KeepFirst) is KeepFirst  # the same class again: fine
        cfg = tp.ReductionConfig(strategy="test_keep_first", layer=1, keep=4)
        assert cfg.params == {}
    finally:
        STRATEGIES.unregister("test_keep_first")
    assert "test_keep_first" not in tp.list_strategies()
    with pytest.raises(tp.UnknownNameError):
        tp.strategy_class("test_keep_first")


def test_registering_a_different_class_under_a_taken_name_names_both() -> None:
    @tp.register_strategy("test_taken")
    class First(tp.ScoreReducer):
        def score(self, view: tp.TokenView):
            return view.hidden.sum(-1)

    class Second(First):
        pass

    try:
        with pytest.raises(tp.PluginError) as caught:
            tp.register_strategy("test_taken")(Second)
        message = str(caught.value)
        assert f"{__name__}:{First.__qualname__}" in message
        assert f"{__name__}:{Second.__qualname__}" in message
        assert tp.strategy_class("test_taken") is First
    finally:
        STRATEGIES.unregister("test_taken")

    with pytest.raises(tp.PluginError, match=r"tokenprune\.strategies\.fastv:FastV \(tokenprune[-_]vlm\)"):
        tp.register_strategy("fastv")(Second)


def test_a_class_whose_name_extends_the_registered_one_is_a_different_class() -> None:
    Fast = type("Fast", (tp.ScoreReducer,), {"score": lambda self, view: view.hidden.sum(-1)})
    Fast.__module__ = "tokenprune.strategies.fastv"  # its origin is a prefix of FastV's
    with pytest.raises(tp.PluginError, match="taken twice"):
        tp.register_strategy("fastv")(Fast)
    assert tp.strategy_class("fastv").__name__ == "FastV"


def test_register_adapter_decorator(toy: nn.Module) -> None:
    from tokenprune.adapters.llava import LlavaAdapter

    @tp.register_adapter("test_llava_by_name")
    class ByName(LlavaAdapter):
        name = "test_llava_by_name"
        model_types = ()

    try:
        assert "test_llava_by_name" in tp.list_adapters()
        assert type(tp.adapter_for(toy, "test_llava_by_name")) is ByName
        assert type(tp.adapter_for(toy)) is not ByName  # empty model_types: never chosen automatically
    finally:
        ADAPTERS.unregister("test_llava_by_name")
    assert "test_llava_by_name" not in tp.list_adapters()


# -- adapter choice ---------------------------------------------------------------------------


def test_automatic_adapter_choice_skips_a_broken_adapter(declare, broken_module: str, toy: nn.Module) -> None:
    declare(GROUPS["adapter"], _entry_point("aaa_broken", f"{broken_module}:Adapter", "tokenprune-broken"))
    assert tp.list_adapters()[0] == "aaa_broken"  # tried first
    assert type(tp.adapter_for(toy)).__name__ == "LlavaAdapter"
    with tp.attach(toy, tp.ReductionConfig(strategy="uniform", layer=1, ratio=0.5)) as handle:
        assert type(handle.adapter).__name__ == "LlavaAdapter"
    with pytest.raises(tp.PluginError, match="missing_lib"):
        tp.adapter_for(toy, "aaa_broken")


def test_attach_without_an_adapter_lists_the_adapters() -> None:
    class Mystery(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(model_type="mystery_vlm")

    cfg = tp.ReductionConfig(strategy="fastv", layer=1, ratio=0.5)
    for model, model_type in [(Mystery(), "mystery_vlm"), (nn.Linear(2, 2), "Linear")]:
        with pytest.raises(tp.AttachError) as caught:
            tp.attach(model, cfg)
        message = str(caught.value)
        assert f"model_type {model_type!r}" in message
        assert "llava" in message
        assert all(name in message for name in tp.list_adapters())
        assert "adapter=" in message


def test_a_plugin_that_is_not_a_reducer_is_refused():
    registry = Registry("strategy", "tokenprune.test-nothing", tp.Reducer)
    with pytest.raises(tp.PluginError, match="not a Reducer subclass"):
        registry.register("not_a_reducer")(int)
