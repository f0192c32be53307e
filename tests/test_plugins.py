"""The example plug-in package (examples/plugin-package), installed for real with pip.

Entry points are read from installed metadata, so the checks run in a fresh interpreter: the
registry of this process may already have cached what it discovered before the install.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "examples" / "plugin-package"
DISTRIBUTION = "tokenprune-plugin-example"

# Runs in a subprocess after the install; prints one JSON object.
CHECKS = r"""
import json

import pydantic
import torch

import tokenprune as tp
from tokenprune.testing.models import IMAGE_TOKEN_ID, toy_llava

out = {"strategies": tp.list_strategies(), "adapters": tp.list_adapters()}
model = toy_llava()
image = torch.full((1, 36), IMAGE_TOKEN_ID)  # the toy model's 6 x 6 patch grid
ids = torch.cat([torch.tensor([[1, 5, 6]]), image, torch.tensor([[7, 8, 9, 10]])], dim=1)
pixels = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
out["auto_adapter"] = type(tp.adapter_for(model)).__name__

with torch.no_grad():  # the input of decoder layer 1 without any reduction: what `norm` ranks
    hidden = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states[1]
out["norms"] = hidden[0].norm(dim=-1).tolist()

for largest in (True, False):
    cfg = tp.ReductionConfig(strategy="norm", layer=1, ratio=0.5, params={"largest": largest})
    with tp.attach(model, cfg, adapter="example_llava") as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)
        event = handle.trace[0]
        out[f"largest={largest}"] = {
            "adapter": type(handle.adapter).__module__,
            "reducer": type(handle.reducer).__module__,
            "visual_before": event.visual_before,
            "visual_after": event.visual_after,
            "kept": event.kept[0].tolist(),
        }

try:
    tp.ReductionConfig(strategy="norm", layer=1, ratio=0.5, params={"largst": False})
except pydantic.ValidationError as exc:
    out["typo"] = str(exc)
print(json.dumps(out))
"""


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The example package pip-installed into this environment (no download, no dependency change)."""
    source = tmp_path_factory.mktemp("plugin") / "plugin-package"  # builds write into the source tree
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _pip("install", "--no-deps", "--no-build-isolation", "--force-reinstall", "--quiet", str(source))
    try:
        yield
    finally:
        _pip("uninstall", "--yes", "--quiet", DISTRIBUTION)


@pytest.fixture(scope="module")
def results(installed_plugin: None) -> dict:
    done = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_installed_names_are_listed(results: dict) -> None:
    assert "norm" in results["strategies"]
    assert {"fastv", "random", "uniform"} <= set(results["strategies"])
    assert {"example_llava", "llava"} <= set(results["adapters"])


def test_plugin_adapter_is_used_only_by_name(results: dict) -> None:
    assert results["auto_adapter"] == "LlavaAdapter"
    for largest in (True, False):
        assert results[f"largest={largest}"]["adapter"] == "tokenprune_plugin_example.adapter"
        assert results[f"largest={largest}"]["reducer"] == "tokenprune_plugin_example.norm"


@pytest.mark.parametrize("largest", [True, False])
def test_plugin_strategy_keeps_the_ranked_half(results: dict, largest: bool) -> None:
    run = results[f"largest={largest}"]
    assert run["visual_before"] == [36]
    assert run["visual_after"] == [18]
    visual = range(3, 39)
    ranked = sorted(visual, key=lambda p: results["norms"][p], reverse=largest)
    text = [0, 1, 2, 39, 40, 41, 42]
    assert run["kept"] == sorted(text + ranked[:18])


def test_misspelt_param_names_the_field(results: dict) -> None:
    assert "typo" in results, "a misspelt parameter was accepted"
    message = results["typo"]
    assert "largst" in message
    assert "norm" in message
