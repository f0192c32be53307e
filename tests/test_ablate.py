"""`tokenprune ablate` and `tokenprune report`: configs, grid, results store, resume after a kill, reports.

The model is a toy LLaVA with random weights saved by the test with its processor and loaded back
through `from_pretrained`; the dataset is a JSONL file with PNG images written by the test.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

import tokenprune as tp
from tokenprune.builtin.models import toy_llava_processor
from tokenprune.builtin.toyvqa import GRID, IMAGE_SIZE, PATCH_SIZE, generate_samples
from tokenprune.errors import ConfigError
from tokenprune.lab.cli import main
from tokenprune.lab.datasets import jsonl_samples, load_samples
from tokenprune.lab.report import build_report, pareto_front
from tokenprune.lab.results import CorruptLineWarning, ResultStore, merge_rows, read_rows
from tokenprune.lab.runner import (
    Outputs,
    accuracy,
    expand_grid,
    fidelity,
    load_ablation_config,
    parse_shard,
    run_ablation,
    shard_cells,
    survival_map,
)
from tokenprune.registry import STRATEGIES
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava

ROOT = Path(__file__).parents[1]
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A toy LLaVA (random weights, 4 layers) and its processor, saved for `from_pretrained`."""
    folder = tmp_path_factory.mktemp("checkpoint")
    model = toy_llava(ToySize(grid=GRID, patch=PATCH_SIZE, vocab=64), seed=1)
    model.generation_config.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(folder)
    toy_llava_processor().save_pretrained(folder)
    assert toy_llava_processor().tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A JSONL file of toy questions with their images written as PNG files beside it (one has two)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "images").mkdir()
    lines = []
    for i, sample in enumerate(generate_samples("test", 6, seed=3)):
        sample.image.save(folder / "images" / f"{i}.png")
        images = f"images/{i}.png" if i != 2 else ["images/2.png", "images/0.png"]
        lines.append(
            {"id": sample.id, "image": images, "question": sample.question, "answer": sample.answers[0]}
        )
    (folder / "vqa.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder / "vqa.jsonl"


def write_config(path: Path, checkpoint: Path, data: Path, **fields) -> Path:
    base = {
        "output": str(path.parent / "runs"),
        "model": {"source": str(checkpoint), "prompt": "<image> {question} answer:"},
        "dataset": {"source": str(data), "limit": 6},
        "generation": {"max_new_tokens": 2},
        "batch_size": 6,
        "threads": 1,
        "timing": {"warmup": 0, "repeats": 1, "decode_tokens": 2},
        "grid": {"strategies": ["fastv", "random"], "layers": [1], "ratios": [0.5, 0.75]},
    }
    path.write_text(yaml.safe_dump({**base, **fields}))
    return path


# -- configuration and grid -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"strategies": ["fastvv"]}, "grid.strategies: unknown strategy 'fastvv'. Did you mean"),
        ({"strategies": ["fastv"], "ratios": [1.5]}, "grid.ratios"),
        ({"strategies": ["fastv"], "layers": [-1]}, "grid.layers"),
        ({"strategies": []}, "grid.strategies"),
        ({"stratgies": ["fastv"]}, "grid.stratgies: Extra inputs are not permitted"),
        ({"strategies": ["fastv"], "layers": [0]}, "grid: layers: fastv at layer 0"),
        (
            {"strategies": ["fastv"], "params": {"fastv": {"scor": ["last"]}}},
            "grid: params.fastv: params of strategy 'fastv': scor: Extra inputs",
        ),
        (
            {"strategies": ["fastv"], "params": {"uniform": {}}},
            "grid: params.uniform: 'uniform' is not one of",
        ),
        (
            {"strategies": ["fastv"], "extra": [{"strategy": "fastv", "layer": 0, "ratio": 0.5}]},
            "grid: extra.0: strategy 'fastv' ranks",
        ),
        ({"strategies": ["fastv"], "extra": [{"strategy": "nope", "ratio": 0.5}]}, "grid.extra.0.strategy"),
        ({"strategies": ["fastv"], "keeps": [-1]}, "grid.keeps"),
        ({"strategies": ["fastv"], "sites": {"tome": {"layers": [1]}}}, "grid: sites.tome: 'tome' is not"),
        ({"strategies": ["fastv"], "sites": {"fastv": {"site": "projector"}}}, "grid.sites.fastv.site"),
        ({"strategies": ["fastv"], "sites": {"fastv": {"layers": [0]}}}, "grid: layers: fastv at layer 0"),
        ({"strategies": ["fastv"], "sites": {"fastv": {"site": "vision"}}}, "give its `layers`"),
        ({"strategies": ["fastv"], "sites": {"fastv": {"layers": [-1]}}}, "grid.sites.fastv: layers are"),
    ],
)
def test_bad_grids_name_the_file_and_field(tmp_path, grid, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": grid}))
    with pytest.raises(ConfigError) as error:
        load_ablation_config(path)
    assert str(path) in str(error.value) and message in str(error.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"modle": {}}, "modle: Extra inputs are not permitted"),
        ({"model": {"prompt": "no question here"}}, "model.prompt"),
        ({"model": {"dtype": "float8"}}, "model.dtype"),
        ({"dataset": {"limit": 0}}, "dataset.limit"),
        ({"name": "a/b"}, "name"),
        ({"seeds": []}, "seeds"),
    ],
)
def test_bad_fields_name_the_file_and_field(tmp_path, fields, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": {"strategies": ["fastv"]}, **fields}))
    with pytest.raises(ConfigError) as error:
        load_ablation_config(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_unreadable_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_ablation_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        load_ablation_config(tmp_path / "list.yaml")


def test_grid_is_the_product_plus_extra_cells_with_the_baseline_first(tmp_path):
    path = tmp_path / "grid.yaml"
    grid = {
        "strategies": ["fastv", "random", "uniform"],
        "layers": [1, 2],
        "ratios": [0.5, 0.75],
        "params": {"fastv": {"score": ["last", "mean"]}},
        "extra": [
            {"strategy": "divprune", "layer": 0, "keep": 9},
            {"strategy": "uniform", "layer": 1, "ratio": 0.5},  # already in the product: not twice
        ],
    }
    path.write_text(yaml.safe_dump({"seeds": [0, 1], "grid": grid}))
    cells = expand_grid(load_ablation_config(path))
    labels = [cell.label for cell in cells]
    assert labels[0] == "baseline" and cells[0].reduction is None
    # fastv: 2 layers x 2 ratios x 2 scores; random: x 2 seeds; uniform: no seed parameter
    assert sum(label.startswith("fastv") for label in labels) == 8
    assert sum(label.startswith("random") for label in labels) == 8
    assert sum(label.startswith("uniform") for label in labels) == 4
    assert labels[-1] == "divprune K=0 keep=9"
    assert "fastv K=2 R=0.75 score=mean" in labels and "random K=1 R=0.5 seed=1" in labels
    assert len({cell.key for cell in cells}) == len(cells) == 1 + 8 + 8 + 4 + 1
    assert [cell.index for cell in cells] == list(range(len(cells)))
    random_seed_1 = cells[labels.index("random K=1 R=0.5 seed=1")]
    assert random_seed_1.reduction.params == {"seed": 1} and random_seed_1.config()["seed"] == 1


def test_keeps_and_sites_place_each_strategy_at_its_own_budget_and_site(tmp_path):
    path = tmp_path / "grid.yaml"
    grid = {
        "strategies": ["fastv", "divprune", "visionzip"],
        "layers": [2],
        "ratios": [0.5],
        "keeps": [16, 32],
        "sites": {"divprune": {"layers": [0]}, "visionzip": {"site": "vision", "layers": [0]}},
    }
    path.write_text(yaml.safe_dump({"grid": grid}))
    cells = expand_grid(load_ablation_config(path))
    labels = [cell.label for cell in cells[1:]]
    assert labels == [
        "fastv K=2 R=0.5",
        "fastv K=2 keep=16",
        "fastv K=2 keep=32",
        "divprune K=0 R=0.5",
        "divprune K=0 keep=16",
        "divprune K=0 keep=32",
        "visionzip K=v0 R=0.5",
        "visionzip K=v0 keep=16",
        "visionzip K=v0 keep=32",
    ]
    vision = cells[-1].reduction.stages
    assert [(s.site, s.layer, s.keep) for s in vision] == [("vision", 0, 32)]


def test_labels_tell_apart_cells_that_differ_only_in_token_order(tmp_path):
    path = tmp_path / "grid.yaml"
    extra = [{"strategy": "tome", "stages": [{"site": "vision", "layer": 0, "ratio": 0.5}]}]
    extra.append({**extra[0], "token_order": "spatial"})
    path.write_text(yaml.safe_dump({"grid": {"strategies": ["fastv"], "extra": extra}}))
    labels = [cell.label for cell in expand_grid(load_ablation_config(path))[2:]]
    assert labels == ["tome K=v0 R=0.5", "tome K=v0 R=0.5 order=spatial"]


def test_extra_cells_run_once_as_written_with_their_own_seed(tmp_path):
    path = tmp_path / "grid.yaml"
    extra = [
        {"strategy": "random", "layer": 1, "keep": 9},
        {"strategy": "random", "layer": 1, "keep": 9, "params": {"seed": 5}},
    ]
    path.write_text(yaml.safe_dump({"seeds": [0, 1, 2], "grid": {"strategies": ["fastv"], "extra": extra}}))
    cells = expand_grid(load_ablation_config(path))[2:]
    assert [(cell.label, cell.seed) for cell in cells] == [
        ("random K=1 keep=9 seed=0", 0),
        ("random K=1 keep=9 seed=5", 5),
    ]
    assert [cell.reduction.params["seed"] for cell in cells] == [0, 5]


def test_a_grid_without_budgets_runs_half_the_tokens(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"grid": {"strategies": ["fastv"]}}))
    assert [cell.label for cell in expand_grid(load_ablation_config(path))][1:] == ["fastv K=2 R=0.5"]
    path.write_text(yaml.safe_dump({"grid": {"strategies": ["fastv"], "keeps": [8]}}))
    assert [cell.label for cell in expand_grid(load_ablation_config(path))][1:] == ["fastv K=2 keep=8"]


def test_cell_keys_follow_the_cell_and_what_it_is_measured_on(tmp_path):
    def keys(**fields) -> list[str]:
        path = tmp_path / "k.yaml"
        path.write_text(yaml.safe_dump({"grid": {"strategies": ["fastv"], "ratios": [0.5, 0.75]}, **fields}))
        return [cell.key for cell in expand_grid(load_ablation_config(path))]

    assert keys() == keys(name="other", timing={"repeats": 9})  # runtime settings: same cells
    assert keys()[0] != keys(dataset={"limit": 5})[0]  # other samples: other results
    assert keys()[1:] != keys(grid={"strategies": ["fastv"], "ratios": [0.5, 0.75], "layers": [1]})[1:]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_cover_every_cell_exactly_once(tmp_path, count):
    path = tmp_path / "grid.yaml"
    grid = {"strategies": ["fastv", "random", "uniform"], "layers": [1, 2], "ratios": [0.25, 0.5, 0.75]}
    path.write_text(yaml.safe_dump({"grid": grid, "seeds": [0, 1]}))
    cells = expand_grid(load_ablation_config(path))
    shards = [shard_cells(cells, parse_shard(f"{i}/{count}")) for i in range(count)]
    keys = [cell.key for shard in shards for cell in shard]
    assert sorted(keys) == sorted(cell.key for cell in cells)
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_bad_shards_are_refused(text):
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)


def test_default_config_lists_its_cells(capsys):
    assert main(["ablate", str(ROOT / "configs" / "ablation-default.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr()
    listed = out.out.splitlines()[1:]
    assert "baseline" in listed[0]
    for name in ("fastv", "random", "uniform"):
        assert any(line.endswith(name) or f" {name} K=" in line for line in listed)
    if "tome" in tp.list_strategies():
        assert any(" tome K=" in line for line in listed)
    else:
        assert "skipping strategy 'tome': not installed" in out.err


@pytest.mark.parametrize(
    ("page", "run"), [("running-an-ablation.md", "ablation-default"), ("paper-grid.md", "paper-grid")]
)
def test_the_docs_show_the_committed_run(tmp_path, page, run):
    doc = (ROOT / "docs" / page).read_text()
    committed = ROOT / "docs" / "ablation" / run
    config = ROOT / "configs" / f"{run}.yaml"
    assert config.read_text() in doc
    summary = (committed / "summary.md").read_text()
    assert summary.split("\n\n")[0] in doc  # the table, as the command wrote it
    rows = read_rows(committed / "results.jsonl")
    assert [row["key"] for row in rows] == [cell.key for cell in expand_grid(load_ablation_config(config))]
    build_report([committed], tmp_path)  # the committed rows give the committed tables
    assert (tmp_path / "summary.md").read_text() == summary
    assert (tmp_path / "summary.csv").read_text() == (committed / "summary.csv").read_text()


def test_the_paper_grid_runs_every_method_at_its_exact_budgets():
    rows = read_rows(ROOT / "docs" / "ablation" / "paper-grid" / "results.jsonl")
    reduced = rows[1:]
    assert {row["strategy"] for row in reduced} == {
        "fastv", "random", "uniform", "tome", "divprune", "dart", "visionzip", "pdrop", "fastervlm", "feather"
    }  # fmt: skip
    for row in reduced:
        last = row["cell"]["reduction"]["stages"][-1]
        assert row["visual_tokens_after"] == last["keep"], row["label"]
        assert row["overhead_s"] > 0 and row["flops_ratio"] < 1, row["label"]
    single = [row for row in reduced if len(row["cell"]["reduction"]["stages"]) == 1]
    assert sorted({row["keep"] for row in single}) == [16, 32, 48]  # 64 / 128 / 192 of 576, on 144


# -- results store ----------------------------------------------------------------------------------


def _append_rows(folder: str, worker: int, count: int) -> None:
    store = ResultStore(Path(folder))
    for i in range(count):
        store.append({"key": f"{worker}-{i}", "payload": "x" * 20000})


def test_appends_from_concurrent_processes_stay_whole_lines(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_rows, args=(str(tmp_path), w, 20)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 80 and all(len(row["payload"]) == 20000 for row in rows)


def test_a_torn_last_line_is_dropped_with_a_warning_and_cut_before_the_next_append(tmp_path):
    store = ResultStore(tmp_path)
    store.append({"key": "a", "value": 1})
    store.append({"key": "b", "value": 2})
    with store.path.open("ab") as handle:
        handle.write(b'{"key": "c", "val')  # a write killed half-way
    with pytest.warns(CorruptLineWarning, match="line 3"):
        assert [row["key"] for row in read_rows(store.path)] == ["a", "b"]
    with pytest.warns(CorruptLineWarning, match="unfinished last line"):
        ResultStore(tmp_path).append({"key": "c", "value": 3})
    assert [json.loads(line)["key"] for line in store.path.read_text().splitlines()] == ["a", "b", "c"]


def test_unreadable_lines_anywhere_are_dropped_and_shards_merge(tmp_path):
    (tmp_path / "results.shard-0-of-2.jsonl").write_text('{"key": "a", "index": 0}\nnot json\n[1, 2]\n')
    (tmp_path / "results.shard-1-of-2.jsonl").write_text('{"key": "b", "index": 1}\n{"no key": 1}\n')
    with pytest.warns(CorruptLineWarning) as caught:
        rows = merge_rows(sorted(tmp_path.glob("results*.jsonl")))
    assert [row["key"] for row in rows] == ["a", "b"] and len(caught) == 3


def test_a_whole_last_line_without_newline_is_kept(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"key": "a"}')
    ResultStore(tmp_path).append({"key": "b"})
    assert [row["key"] for row in read_rows(tmp_path / "results.jsonl")] == ["a", "b"]


# -- datasets ---------------------------------------------------------------------------------------


def test_jsonl_dataset_reads_images_relative_to_the_file(dataset):
    samples = jsonl_samples(dataset)
    assert len(samples) == 6 and samples[0].images[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    assert len(samples[2].images) == 2 and isinstance(samples[0].answers, list)
    assert [s.id for s in load_samples(str(dataset), "test", 2)] == [s.id for s in samples[:2]]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "x.png", "answer": "red"}', "line 2: question: Field required"),
        ('{"image": "missing.png", "question": "q", "answer": "red"}', "line 2: cannot open image"),
        ('{"image": "x.png", "question": "q"}', "line 2: answers: Field required"),
        ("{oops", "line 2: not valid JSON"),
    ],
)
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path, line, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    path = tmp_path / "d.jsonl"
    path.write_text('{"image": "x.png", "question": "q", "answers": ["a"]}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        jsonl_samples(path)
    assert str(path) in str(error.value)


def test_unknown_dataset_sources_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a builtin name"):
        load_samples(str(tmp_path / "nothing.jsonl"), "test", 2)
    with pytest.raises(ConfigError, match="unknown builtin dataset"):
        load_samples("builtin:nope", "test", 2)


def test_a_saved_datasets_folder_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="pip install datasets"):
        load_samples(str(tmp_path), "test", 2)


def test_a_saved_datasets_folder_is_read(tmp_path):
    import datasets
    samples = generate_samples("test", 3)
    table = datasets.Dataset.from_dict(
        {
            "image": [s.image for s in samples],
            "question": [s.question for s in samples],
            "answers": [s.answers for s in samples],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answers": datasets.Sequence(datasets.Value("string")),
            }
        ),
    )
    datasets.DatasetDict({"test": table}).save_to_disk(tmp_path / "saved")
    loaded = load_samples(str(tmp_path / "saved"), "test", 2)
    assert [s.question for s in loaded] == [s.question for s in samples[:2]]
    with pytest.raises(ConfigError, match="no split 'train'"):
        load_samples(str(tmp_path / "saved"), "train", 2)


# -- metrics ----------------------------------------------------------------------------------------


def test_accuracy_normalises_and_contains_matches_whole_words():
    scores = accuracy(["The Red.", "reddish", "it is red", "blue"], [["red"], ["red"], ["red"], ["red"]])
    assert scores == {"accuracy_exact": 0.25, "accuracy_contains": 0.5}


def _outputs(logits: list[list[float]], continuations: list[list[int]]) -> Outputs:
    logprobs = torch.log_softmax(torch.tensor(logits), dim=-1)
    n = len(continuations)
    return Outputs(logprobs, continuations, [""] * n, [1] * n, [1] * n, [1] * n, None)


def test_fidelity_against_the_reference():
    reference = _outputs([[2.0, 0.0], [0.0, 2.0]], [[5, 6], [7]])
    assert fidelity(reference, reference) == {
        "top1_agreement": 1.0,
        "first_token_kl": 0.0,
        "continuation_match": 1.0,
    }
    other = fidelity(_outputs([[2.0, 0.0], [2.0, 0.0]], [[5, 6], [8]]), reference)
    assert other["top1_agreement"] == 0.5 and other["continuation_match"] == 0.5
    assert other["first_token_kl"] == pytest.approx(0.5 * 2 * (torch.tensor(1.0).tanh().item()), rel=1e-5)


def test_survival_map_draws_kept_tokens_and_merge_groups(llava_sdpa):
    adapter = tp.adapter_for(llava_sdpa)
    ids = torch.tensor([[20, *[IMAGE_TOKEN_ID] * 36, 21]])
    inputs = {"input_ids": ids, "pixel_values": torch.zeros(1, 3, 24, 24)}
    kept = torch.tensor([[0, 1, 2, 37]])  # text, the first two visual tokens (grid cells 0 and 1), text
    event = tp.ReductionEvent(1, [38], [4], [36], [2], kept)
    assert survival_map(adapter, inputs, [event]) == {"grid": [6, 6], "state": [0, 1, *[-1] * 34]}
    groups = torch.full((1, 38), -1)
    groups[0, [1, 7, 8]] = 1  # cells 0, 6 and 7 merge into cell 0's token
    groups[0, 2] = 2
    merged = SimpleNamespace(kept=kept, groups=groups)
    assert survival_map(adapter, inputs, [merged])["state"][:8] == [0, 1, -1, -1, -1, -1, 0, 0]


def test_pareto_front_keeps_the_points_nothing_beats():
    assert pareto_front([(3, 0.9), (1, 0.5), (2, 0.4), (2, 0.7), (4, 0.8)]) == [(1, 0.5), (2, 0.7), (3, 0.9)]


# -- whole runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, checkpoint, dataset) -> Path:
    """One complete run on the saved checkpoint (read back by `from_pretrained`) and the JSONL data."""
    folder = tmp_path_factory.mktemp("run")
    config = write_config(
        folder / "small.yaml",
        checkpoint,
        dataset,
        grid={
            "strategies": ["fastv", "uniform"],
            "layers": [1],
            "ratios": [0.5],
            "extra": [{"strategy": "random", "layer": 0, "keep": 9}],
        },
    )
    assert main(["ablate", str(config)]) == 0
    return folder / "runs" / "small"


def test_rows_hold_every_metric_for_every_cell(finished_run):
    rows = read_rows(finished_run / "results.jsonl")
    assert [row["label"] for row in rows] == [
        "baseline",
        "fastv K=1 R=0.5",
        "uniform K=1 R=0.5",
        "random K=0 keep=9 seed=0",
    ]
    baseline, fastv, uniform, random = rows
    assert baseline["top1_agreement"] == 1.0 and baseline["first_token_kl"] == 0.0
    assert baseline["prefill_speedup"] == 1.0 and baseline["flops_ratio"] == 1.0
    for row in rows:
        assert row["samples"] == 6 and 0 <= row["accuracy_exact"] <= row["accuracy_contains"] <= 1
        assert row["prefill_s"] > 0 and row["decode_s_per_token"] >= 0 and row["baseline_prefill_s"] > 0
        assert row["peak_memory_bytes"] is None  # CPU: not measured
        assert row["environment"]["torch"] == torch.__version__ and row["cell"]["seed"] == 0
    for row, kept in ((fastv, 72), (uniform, 72), (random, 9)):
        assert row["flops_ratio"] < 1 and row["kv_cache_bytes"] < baseline["kv_cache_bytes"]
        assert row["overhead_s"] > 0 and row["first_token_kl"] >= 0
        assert (
            row["survival"]["grid"] == [GRID, GRID] and sum(s >= 0 for s in row["survival"]["state"]) == kept
        )
    assert fastv["visual_tokens_after"] == pytest.approx((72 * 5 + 144) / 6)  # sample 2 has two images
    assert (finished_run / "sample.png").exists()


def test_report_is_rebuilt_from_the_rows(finished_run, tmp_path, capsys):
    summary = (finished_run / "summary.md").read_text()
    assert summary.count("\n| ") == 5 and "| fastv K=1 R=0.5 |" in summary
    names = {"summary.csv", "accuracy-vs-flops.pdf", "fidelity-vs-ratio.png", "speedup-vs-flops-bound.png"}
    names |= {f"survival-{s}.png" for s in ("fastv", "uniform", "random")}
    assert names <= {p.name for p in finished_run.iterdir()}
    assert main(["report", str(finished_run), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.csv").read_text() == (finished_run / "summary.csv").read_text()
    assert (tmp_path / "summary.md").read_text() == summary
    assert (tmp_path / "accuracy-vs-flops.png").read_bytes() == (
        finished_run / "accuracy-vs-flops.png"
    ).read_bytes()


def test_report_merges_shards_from_several_folders(finished_run, tmp_path):
    rows = read_rows(finished_run / "results.jsonl")
    for i in range(2):
        (tmp_path / f"machine{i}").mkdir()
        shard = tmp_path / f"machine{i}" / f"results.shard-{i}-of-2.jsonl"
        shard.write_text("".join(json.dumps(row) + "\n" for row in rows[i::2]))
    build_report([tmp_path / "machine0", tmp_path / "machine1"], tmp_path / "merged")
    assert (tmp_path / "merged" / "summary.csv").read_text() == (finished_run / "summary.csv").read_text()


def test_a_finished_run_is_not_run_again(finished_run, capsys):
    config = finished_run.parents[1] / "small.yaml"
    run_ablation(config)
    assert "4 cells, 4 already finished" in capsys.readouterr().err
    assert len(read_rows(finished_run / "results.jsonl")) == 4


def test_the_builtin_model_answers_the_builtin_task(tmp_path):
    timing = {"warmup": 0, "repeats": 1, "decode_tokens": 2}
    grid = {"strategies": ["fastv"], "layers": [2], "ratios": [0.5]}
    config = {"output": str(tmp_path), "threads": 1, "dataset": {"limit": 8}, "timing": timing, "grid": grid}
    (tmp_path / "builtin.yaml").write_text(yaml.safe_dump(config))
    run_ablation(tmp_path / "builtin.yaml")
    baseline, fastv = read_rows(tmp_path / "builtin" / "results.jsonl")
    assert baseline["accuracy_exact"] == 1.0 and baseline["samples"] == 8
    assert fastv["visual_tokens_after"] == 72 and fastv["survival"]["grid"] == [12, 12]


def test_layers_past_the_model_are_refused_before_any_cell(tmp_path, checkpoint, dataset):
    config = write_config(
        tmp_path / "deep.yaml", checkpoint, dataset, grid={"strategies": ["fastv"], "layers": [1, 7]}
    )
    with pytest.raises(ConfigError, match=r"deep.yaml: grid.layers: layer\(s\) \[7\] past"):
        run_ablation(config)
    assert not (tmp_path / "runs" / "deep" / "results.jsonl").exists()


def test_site_layers_past_the_model_are_refused_by_their_field(tmp_path, checkpoint, dataset):
    grid = {"strategies": ["fastv", "random"], "layers": [1], "sites": {"random": {"layers": [9]}}}
    config = write_config(tmp_path / "deep.yaml", checkpoint, dataset, grid=grid)
    with pytest.raises(ConfigError, match=r"deep.yaml: grid.sites.random.layers: layer\(s\) \[9\] past"):
        run_ablation(config)


def test_vision_site_and_keep_budgets_run_on_the_builtin_model(tmp_path):
    timing = {"warmup": 0, "repeats": 1, "decode_tokens": 2}
    grid = {
        "strategies": ["fastv", "visionzip"],
        "layers": [2],
        "keeps": [16],
        "sites": {"visionzip": {"site": "vision", "layers": [0]}},
    }
    config = {"output": str(tmp_path), "threads": 1, "dataset": {"limit": 4}, "timing": timing, "grid": grid}
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(config))
    run_ablation(tmp_path / "paper.yaml")
    _, fastv, visionzip = read_rows(tmp_path / "paper" / "results.jsonl")
    assert (fastv["site"], fastv["keep"], fastv["visual_tokens_after"]) == ("language", 16, 16)
    assert (visionzip["site"], visionzip["keep"], visionzip["visual_tokens_after"]) == ("vision", 16, 16)
    assert visionzip["flops_ratio"] < fastv["flops_ratio"] < 1.0  # all decoder layers see 16 tokens
    assert visionzip["overhead_s"] > 0.0


@pytest.fixture
def broken_strategy():
    """Registers `broken`: a strategy whose selection breaks the Reducer contract (keeps nothing)."""

    @tp.register_strategy("broken")
    class Broken(tp.Reducer):
        def select(self, view: tp.TokenView) -> torch.Tensor:
            return torch.zeros_like(view.candidates)

    yield "broken"
    STRATEGIES.unregister("broken")


def test_a_failing_cell_is_reported_not_recorded_and_the_others_run(
    tmp_path, checkpoint, dataset, broken_strategy, capsys
):
    grid = {"strategies": [broken_strategy, "uniform"], "layers": [1], "ratios": [0.5]}
    config = write_config(tmp_path / "failing.yaml", checkpoint, dataset, grid=grid)
    assert main(["ablate", str(config), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "cell 1 (broken K=1 R=0.5) failed: Broken.select kept" in err
    assert "1 cell(s) failed and were not recorded: broken K=1 R=0.5" in err
    rows = read_rows(tmp_path / "runs" / "failing" / "results.jsonl")
    assert [row["label"] for row in rows] == ["baseline", "uniform K=1 R=0.5"]


def test_the_command_line_names_a_bad_config(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": {"strategies": ["fastvv"]}}))
    assert main(["ablate", str(path)]) == 2
    assert f"tokenprune: error: {path}: grid.strategies: unknown strategy 'fastvv'" in capsys.readouterr().err


def test_resume_after_a_kill_runs_each_cell_once(tmp_path, checkpoint, dataset):
    config = write_config(
        tmp_path / "killed.yaml", checkpoint, dataset, dataset={"source": str(dataset), "limit": 3}
    )
    results = tmp_path / "runs" / "killed" / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenprune.lab.cli", "ablate", str(config), "--no-report", "--threads", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (results.exists() and results.read_bytes().count(b"\n") >= 1):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = read_rows(results)
    assert 1 <= len(before) < 5  # killed mid-run
    run_ablation(config)
    after = [row["key"] for row in read_rows(results)]
    cells = expand_grid(load_ablation_config(config))
    assert sorted(after) == sorted(cell.key for cell in cells)  # every cell once: none lost, none twice
    assert after[: len(before)] == [row["key"] for row in before]
