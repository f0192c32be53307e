"""`tokenprune run`: the README's main job, on the built-in model and on a locally saved checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tokenprune.lab.cli import main
from tokenprune.testing.models import ToySize, toy_llava

FAST = {"repeats": 1, "max_new_tokens": 2, "text_tokens": 6}


def write_config(path: Path, **fields) -> Path:
    base = yaml.safe_load((Path(__file__).parents[1] / "configs" / "llava-fastv.yaml").read_text())
    path.write_text(yaml.safe_dump({**base, **FAST, **fields}))
    return path


def test_run_on_the_builtin_model(tmp_path, capsys):
    assert main(["run", str(write_config(tmp_path / "run.yaml")), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "tokens 582 -> 294 per sample (visual 576 -> 288)" in out
    assert "prefill FLOPs (G)" in out and "decode time (ms/token)" in out and "FLOPs bound speed-up" in out


def test_run_on_a_checkpoint_saved_locally(tmp_path, capsys):
    toy_llava(ToySize(grid=6, patch=4), seed=2).save_pretrained(tmp_path / "ckpt")
    config = write_config(
        tmp_path / "run.yaml",
        model=str(tmp_path / "ckpt"),
        reduction={"strategy": "uniform", "layer": 1, "keep": 9},
    )
    assert main(["run", str(config)]) == 0
    assert "visual 36 -> 9" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"reduction": {"strategy": "fastvv", "ratio": 0.5}}, "Did you mean 'fastv'"),
        ({"batch_size": 0}, "batch_size"),
        ({"modle": "x"}, "modle"),
        ({"model": "builtin:nope"}, "unknown builtin model"),
        ({"reduction": {"layer": 9, "ratio": 0.5}}, "past the last decoder layer"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, capsys, fields, message):
    assert main(["run", str(write_config(tmp_path / "bad.yaml", **fields))]) == 2
    assert message in capsys.readouterr().err


def test_console_script_lists_names():
    out = subprocess.run(
        [sys.executable, "-m", "tokenprune.lab.cli", "strategies"], capture_output=True, text=True, check=True
    )
    assert {"fastv", "random", "uniform"} <= set(out.stdout.split())


def test_run_names_the_site_and_unit_of_each_trace_event(tmp_path, capsys):
    vision = {"strategy": "visionzip", "stages": [{"site": "vision", "layer": 0, "keep": 16}]}
    assert main(["run", str(write_config(tmp_path / "vision.yaml", reduction=vision))]) == 0
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "vision layer 0 tokens 577 -> 17 per image (visual 576 -> 16)" in lines  # CLS + patches
    assert "language layer 0 tokens 582 -> 22 per sample (visual 576 -> 16)" in lines  # what the decoder sees
