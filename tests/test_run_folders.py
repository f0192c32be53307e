"""Run folders that never mix: fingerprints, refusals, restarts and branches, reports over several
folders, up-front checks, Ctrl-C.

The model is the toy LLaVA checkpoint of `test_ablate` (random weights, 4 decoder layers, 2 vision
layers read at layer 0, 144 visual tokens per image); the dataset its JSONL file of 6 toy questions.
"""

# ruff: noqa: F811 (test_ablate's fixtures are arguments of the tests here)

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from test_ablate import checkpoint, dataset, write_config  # noqa: F401 (the fixtures are used by name)

from tokenprune.contracts.layout import Segment, VisualLayout
from tokenprune.errors import ConfigError
from tokenprune.lab import fingerprint as fingerprints
from tokenprune.lab.checks import check_batch_keeps
from tokenprune.lab.cli import main
from tokenprune.lab.config import load_ablation_config
from tokenprune.lab.fingerprint import FINGERPRINT_FILE, Fingerprint, file_digest, folder_digest, model_part
from tokenprune.lab.grid import expand_grid
from tokenprune.lab.report import build_report
from tokenprune.lab.results import merge, read_rows
from tokenprune.lab.runner import run_ablation

UNIFORM = {"strategies": ["uniform"], "layers": [1], "ratios": [0.5]}


def small_config(path: Path, checkpoint: Path, data: Path, **fields) -> Path:
    """An ablation of uniform at K=1 R=0.5 (and the baseline) on the first 2 samples."""
    return write_config(
        path, checkpoint, data, **{"grid": UNIFORM, "dataset": {"source": str(data), "limit": 2}, **fields}
    )


def copy_dataset(source: Path, folder: Path) -> Path:
    """The JSONL file and its images copied into `folder` (to edit or move them)."""
    shutil.copytree(source.parent, folder)
    return folder / source.name


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, checkpoint, dataset) -> Path:
    """A finished small run; tests copy its folder before changing anything."""
    folder = tmp_path_factory.mktemp("first")
    config = small_config(folder / "small.yaml", checkpoint, dataset)
    run_ablation(config)
    return folder


def copy_run(first_run: Path, tmp_path: Path) -> Path:
    """The first run's config and run folder under `tmp_path`; returns the config (its `output` moved)."""
    shutil.copytree(first_run / "runs", tmp_path / "runs")
    settings = yaml.safe_load((first_run / "small.yaml").read_text())
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({**settings, "output": str(tmp_path / "runs")}))
    return config


def edit_config(config: Path, **fields) -> None:
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, **fields}))


# -- fingerprints and cell keys -------------------------------------------------------------------


def test_cell_keys_follow_the_datasets_contents_not_its_path(tmp_path, dataset):
    def keys(data: Path) -> list[str]:
        small_config(tmp_path / "k.yaml", Path("/nowhere"), data)
        return [cell.key for cell in expand_grid(load_ablation_config(tmp_path / "k.yaml"))]

    moved = copy_dataset(dataset, tmp_path / "moved")
    assert keys(moved) == keys(dataset)  # the same samples elsewhere: the same cells
    lines = moved.read_text().splitlines()
    first = json.loads(lines[0])
    moved.write_text("\n".join([json.dumps({**first, "answer": "purple"}), *lines[1:]]) + "\n")
    edited = keys(moved)
    assert not set(edited) & set(keys(dataset))  # one answer edited: every cell is another cell


def test_the_run_folder_records_its_fingerprint_and_every_row_carries_it(first_run):
    folder = first_run / "runs" / "small"
    written = json.loads((folder / FINGERPRINT_FILE).read_text())
    assert set(written) == {"fingerprint", "config", "dataset", "model", "versions"}
    assert written["versions"]["torch"] == torch.__version__ and written["dataset"]["samples"] == 2
    assert [cell["label"] for cell in written["config"]["cells"]] == ["baseline", "uniform K=1 R=0.5"]
    assert written["model"]["identity"] == "digest of the folder's files"
    rows = read_rows(folder / "results.jsonl")
    assert len(rows) == 2 and {row["fingerprint"] for row in rows} == {written["fingerprint"]}


def test_large_weight_files_are_digested_by_header_and_strided_bytes(tmp_path, monkeypatch):
    """Above the whole-file limit: a changed byte inside a sampled chunk or the header changes the
    digest; the modification time alone does not."""
    monkeypatch.setattr(fingerprints, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(fingerprints, "CHUNK_BYTES", 64)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2048], "data_offsets": [0, 8192]}}).encode()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8192))
    before = file_digest(weights)
    os.utime(weights, (1, 1))
    assert file_digest(weights) == before
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last chunk is always sampled
    weights.write_bytes(bytes(data))
    assert file_digest(weights) != before
    data[-1] ^= 1
    data[20] ^= 1  # inside the header
    weights.write_bytes(bytes(data))
    assert file_digest(weights) != before


def test_a_checkpoint_folder_is_known_by_its_files_and_a_hub_id_by_its_cached_commit(
    tmp_path,
    checkpoint,
    monkeypatch,
):
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    assert folder_digest(copy) == folder_digest(checkpoint)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("\n", " \n", 1))
    assert folder_digest(copy) != folder_digest(checkpoint)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_part("org/model")["digest"] == "org/model"  # not cached: the id
    snapshot = tmp_path / "hub" / "models--org--model" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--model" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--model" / "refs" / "main").write_text("ab" * 20)
    assert model_part("org/model")["digest"] == "ab" * 20


# -- reruns into a folder: refused, restarted, branched ------------------------------------------------


def test_a_rerun_with_other_cells_is_refused_naming_them(first_run, tmp_path):
    config = copy_run(first_run, tmp_path)
    edit_config(config, grid={**UNIFORM, "ratios": [0.75]})
    with pytest.raises(ConfigError) as error:
        run_ablation(config)
    message = str(error.value)
    assert "config: cells added: uniform K=1 R=0.75; cells removed: uniform K=1 R=0.5" in message
    assert "--restart" in message and "--branch NAME" in message
    assert len(read_rows(tmp_path / "runs" / "small" / "results.jsonl")) == 2  # nothing appended


def test_a_rerun_on_other_data_or_settings_is_refused_naming_the_part(first_run, tmp_path, dataset):
    config = copy_run(first_run, tmp_path)
    edit_config(config, dataset={"source": str(dataset), "limit": 3})
    with pytest.raises(ConfigError, match=r"dataset: digest '\w+' -> '\w+'; samples 2 -> 3"):
        run_ablation(config, dry_run=True)  # the dry run says what the run would refuse
    edit_config(config, dataset={"source": str(dataset), "limit": 2}, batch_size=1)
    with pytest.raises(ConfigError, match=r"holds another run: config: batch_size 6 -> 1\. Give --restart"):
        run_ablation(config)


def test_library_versions_that_differ_are_refused_too(first_run, tmp_path, monkeypatch):
    config = copy_run(first_run, tmp_path)
    versions = fingerprints.versions_part()
    monkeypatch.setattr(
        fingerprints, "versions_part", lambda: {**versions, "torch": "9.9", "digest": "other"}
    )
    with pytest.raises(ConfigError, match=r"versions: .*torch '.+' -> '9.9'.*not mixed in one run"):
        run_ablation(config)


def test_a_folder_of_rows_without_a_fingerprint_is_refused(first_run, tmp_path):
    config = copy_run(first_run, tmp_path)
    (tmp_path / "runs" / "small" / FINGERPRINT_FILE).unlink()
    with pytest.raises(ConfigError, match=r"holds results rows but no fingerprint\.json"):
        run_ablation(config)


def test_restart_moves_the_old_rows_aside_and_branch_runs_beside(first_run, tmp_path, capsys):
    config = copy_run(first_run, tmp_path)
    folder = tmp_path / "runs" / "small"
    old = json.loads((folder / FINGERPRINT_FILE).read_text())["fingerprint"]
    edit_config(config, grid={**UNIFORM, "ratios": [0.75]})
    assert main(["ablate", str(config), "--branch", "r75", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("2 cells (0 finished)")
    assert not (tmp_path / "runs" / "small-r75").exists()  # a dry run writes nothing
    assert main(["ablate", str(config), "--restart", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert (
        out.out.startswith("2 cells (0 finished)")
        and "another run in" in out.err
        and "would move aside" in out.err
    )
    assert not list(folder.glob("superseded-*"))
    assert main(["ablate", str(config), "--restart", "--no-report"]) == 0
    assert "--restart: the rows of another run moved into" in capsys.readouterr().err
    (aside,) = folder.glob("superseded-*")
    assert json.loads((aside / FINGERPRINT_FILE).read_text())["fingerprint"] == old
    assert [row["label"] for row in read_rows(aside / "results.jsonl")] == ["baseline", "uniform K=1 R=0.5"]
    assert [row["label"] for row in read_rows(folder / "results.jsonl")] == ["baseline", "uniform K=1 R=0.75"]
    assert json.loads((folder / FINGERPRINT_FILE).read_text())["fingerprint"] != old


# -- reports over several folders -----------------------------------------------------------------------


def _write_rows(folder: Path, rows: list[dict], name: str = "results.jsonl") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_duplicates_are_reported_with_the_row_kept_by_the_rule(first_run, tmp_path, capsys):
    folder = first_run / "runs" / "small"
    baseline, uniform = read_rows(folder / "results.jsonl")
    later = {**uniform, "finished_at": "2999-01-01T00:00:00+00:00", "accuracy_exact": 0.123}
    failed = {k: v for k, v in uniform.items() if k in ("key", "index", "label", "fingerprint")}
    failed |= {"error": "RuntimeError: out of memory", "finished_at": "3000-01-01T00:00:00+00:00"}
    _write_rows(tmp_path / "a", [baseline, uniform])
    _write_rows(tmp_path / "b", [later], "results.shard-1-of-2.jsonl")
    _write_rows(tmp_path / "c", [failed])
    merged = merge(sorted(tmp_path.glob("*/results*.jsonl")))
    assert merged.rows[1]["accuracy_exact"] == 0.123  # the latest measured row; the later error loses
    build_report([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "out")
    (note,) = [
        line for line in (tmp_path / "out" / "summary.md").read_text().splitlines() if "duplicate" in line
    ]
    assert note.startswith(f"- duplicate cell uniform K=1 R=0.5 (key {uniform['key']}): 3 rows in ")
    assert note.endswith(
        f"kept the one of {tmp_path / 'b' / 'results.shard-1-of-2.jsonl'} "
        "(measured, finished 2999-01-01T00:00:00+00:00)"
    )
    assert "report: duplicate cell uniform K=1 R=0.5" in capsys.readouterr().err


def test_rows_of_different_fingerprints_are_refused_in_one_table_unless_allowed(first_run, tmp_path, capsys):
    folder = first_run / "runs" / "small"
    shutil.copytree(folder, tmp_path / "one")
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    written = Fingerprint.read(other)
    # other weights: the cell keys stay the same (they hold no model digest), the fingerprint does not
    changed = Fingerprint({**written.parts, "model": {**written.parts["model"], "digest": "0" * 16}})
    (other / FINGERPRINT_FILE).write_text(changed.to_json())
    rows = [{**row, "fingerprint": changed.short} for row in read_rows(other / "results.jsonl")]
    _write_rows(other, rows)
    with pytest.raises(ConfigError) as error:
        build_report([tmp_path / "one", other], tmp_path / "out")
    message = str(error.value)
    assert (
        f"rows of 2 run fingerprints in one table: {written.short} ({tmp_path / 'one'}); "
        f"{changed.short} ({other})" in message
    )
    assert f"{other} against {tmp_path / 'one'}: model: digest" in message and "--allow-mixed" in message
    assert not (tmp_path / "out").exists()
    assert (
        main(["report", str(tmp_path / "one"), str(other), "--out", str(tmp_path / "out"), "--allow-mixed"])
        == 0
    )
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "- Mixed (--allow-mixed): rows of 2 run fingerprints in one table" in summary
    assert summary.count("\n| ") == 1 + 4  # both folders' rows, under the rule line


# -- up-front checks ----------------------------------------------------------------------------------------


def test_every_problem_is_listed_together_before_any_cell(tmp_path, checkpoint, dataset, capsys):
    grid = {
        "strategies": ["fastv", "visionzip"],
        "layers": [1, 7],
        "keeps": [16, 200],
        "sites": {"visionzip": {"site": "vision", "layers": [0, 1]}},
    }
    config = small_config(tmp_path / "bad.yaml", checkpoint, dataset, grid=grid)
    assert main(["ablate", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{config}: 3 problems found before running: "
        "(1) grid.layers: layer(s) [7] past the model's 4 decoder layers (0..3)" in err
    )
    assert (
        "(2) grid.sites.visionzip.0.layers: layer(s) [1] past vision layer 0, the one feeding the "
        "projector (vision_feature_layer=-2)" in err
    )
    assert (
        "(3) keep=200 > the 144 visual tokens it counts from (from the model's config): "
        "fastv K=1 keep=200, fastv K=7 keep=200, visionzip K=v0 keep=200, visionzip K=v1 keep=200" in err
    )
    with pytest.raises(ConfigError, match="3 problems"):
        run_ablation(config)
    assert not (tmp_path / "runs").exists()


def test_dataset_problems_are_listed_with_the_others(tmp_path, checkpoint, dataset):
    data = copy_dataset(dataset, tmp_path / "data")
    lines = data.read_text().splitlines()
    data.write_text(
        "\n".join([lines[0], json.dumps({**json.loads(lines[1]), "image": "images/gone.png"}), *lines[2:]])
    )
    config = small_config(tmp_path / "bad.yaml", checkpoint, data, grid={**UNIFORM, "layers": [4]})
    with pytest.raises(ConfigError) as error:
        run_ablation(config, dry_run=True)
    assert f"(1) {data} line 2: no image file {data.parent / 'images' / 'gone.png'}" in str(error.value)
    assert "(2) grid.layers: layer(s) [4] past" in str(error.value)
    edit_config(config, dataset={"source": str(data), "limit": 1})  # the first record alone is checked
    with pytest.raises(ConfigError, match=r"bad.yaml: grid.layers: layer\(s\) \[4\] past the model's 4"):
        run_ablation(config, dry_run=True)


def test_a_keep_above_the_builtin_models_visual_tokens_is_refused(tmp_path):
    (tmp_path / "toy.yaml").write_text(
        yaml.safe_dump(
            {
                "output": str(tmp_path),
                "dataset": {"limit": 2},
                "grid": {"strategies": ["fastv"], "keeps": [200]},
            }
        )
    )
    with pytest.raises(
        ConfigError,
        match=r"keep=200 > the 144 visual tokens it counts from \(from the model's config\): "
        "fastv K=2 keep=200",
    ):
        run_ablation(tmp_path / "toy.yaml", dry_run=True)


def test_keeps_are_checked_on_the_first_batch_per_sample_or_per_frame(tmp_path):
    """For models whose config does not say their visual tokens: the layout of the first batch."""
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"grid": {"strategies": ["uniform"], "keeps": [5]}}))
    cells = expand_grid(load_ablation_config(tmp_path / "grid.yaml"), dataset="d")
    two_images = [  # sample 0: two images of 3 tokens each; sample 1: one image of 6
        Segment(0, torch.tensor([1, 2, 3]), torch.zeros(3, 3, dtype=torch.long), (1, 1, 3)),
        Segment(0, torch.tensor([4, 5, 6]), torch.zeros(3, 3, dtype=torch.long), (1, 1, 3)),
        Segment(1, torch.arange(1, 7), torch.zeros(6, 3, dtype=torch.long), (1, 1, 6)),
    ]
    layout = VisualLayout.from_segments(2, 8, two_images, torch.device("cpu"))
    check_batch_keeps(tmp_path / "grid.yaml", cells, layout)  # 6 tokens per sample: keep 5 fits
    per_frame = [
        replace(c, reduction=c.reduction.model_copy(update={"budget": "per_frame"})) for c in cells[1:]
    ]
    with pytest.raises(
        ConfigError,
        match=r"grid.yaml: keep=5 > the 3 visual tokens it counts from "
        r"\(the fewest of a sample in the first batch\)",
    ):
        check_batch_keeps(tmp_path / "grid.yaml", per_frame, layout)


def test_a_dataset_path_is_relative_to_the_config_files_folder(
    tmp_path, checkpoint, dataset, monkeypatch, capsys
):
    copy_dataset(dataset, tmp_path / "configs" / "data")
    config = small_config(tmp_path / "configs" / "rel.yaml", checkpoint, Path("data") / dataset.name)
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert main(["ablate", str(config), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("2 cells (0 finished)")
    edit_config(config, dataset={"source": "nowhere.jsonl", "limit": 2})
    assert main(["ablate", str(config), "--dry-run"]) == 2
    assert (
        f"dataset {str(tmp_path / 'configs' / 'nowhere.jsonl')!r}: not a builtin name"
        in capsys.readouterr().err
    )


# -- Ctrl-C ------------------------------------------------------------------------------------------------


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path, checkpoint, dataset):
    grid = {"strategies": ["uniform", "random"], "layers": [1], "ratios": [0.5, 0.75]}
    config = small_config(tmp_path / "stopped.yaml", checkpoint, dataset, grid=grid)
    results = tmp_path / "runs" / "stopped" / "results.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenprune.lab.cli", "ablate", str(config), "--no-report"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # a terminal's Ctrl-C: a runner started in the background (`cmd &`) ignores SIGINT, and its
        # children would inherit that; Python turns SIGINT into KeyboardInterrupt only from the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 180
    while not (results.exists() and results.read_bytes().count(b"\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    saved = len(read_rows(results))
    assert 1 <= saved < 5 and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.rstrip().splitlines()[-1] == f"{saved} of 5 cells saved; rerun the same command to resume"
    assert re.fullmatch(r"\[\d/5\] .*", err.rstrip().splitlines()[-2])  # progress lines, then that one


def test_an_lmms_eval_source_without_lmms_eval_says_what_to_install(tmp_path, monkeypatch):
    """Where the extra is not installed, a grid over lmms-eval tasks stops before anything runs."""
    from importlib import metadata

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    path = tmp_path / "lmms.yaml"
    grid = {"strategies": ["fastv"], "layers": [2], "keeps": [8]}
    path.write_text(yaml.safe_dump({"dataset": {"source": "lmms-eval", "tasks": ["gqa"]}, "grid": grid}))
    with pytest.raises(ConfigError, match=r"needs lmms-eval: pip install 'tokenprune-vlm\[lmms-eval\]'"):
        run_ablation(path, output=tmp_path)
