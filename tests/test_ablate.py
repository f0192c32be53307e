"""`tokenprune ablate` and `tokenprune report`: configs, grid, results store, resume after a kill, reports.

The model is a toy LLaVA with random weights saved by the test with its processor and loaded back
through `from_pretrained`; the dataset is a JSONL file with PNG images written by the test.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
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
from tokenprune.lab import speed
from tokenprune.lab.cli import main
from tokenprune.lab.config import load_ablation_config
from tokenprune.lab.datasets import jsonl_samples, load_samples
from tokenprune.lab.figures import pareto_front
from tokenprune.lab.grid import expand_grid, parse_shard, shard_cells
from tokenprune.lab.metrics import Outputs, accuracy, fidelity, first_token_kl, survival_map
from tokenprune.lab.report import build_report
from tokenprune.lab.results import CorruptLineWarning, ResultStore, merge_rows, read_rows
from tokenprune.lab.runner import run_ablation
from tokenprune.registry import STRATEGIES
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava

ROOT = Path(__file__).parents[1]
FAST_TIMING = {"warmup": 0, "repeats": 1, "decode_tokens": 32}  # decode is timed over 32 tokens at least


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
        "timing": FAST_TIMING,
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
        ({"strategies": ["fastv"], "sites": {"fastv": {"site": "projector"}}}, "grid.sites.fastv.0.site"),
        ({"strategies": ["fastv"], "sites": {"fastv": {"layers": [0]}}}, "grid: layers: fastv at layer 0"),
        ({"strategies": ["fastv"], "sites": {"fastv": {"site": "vision"}}}, "give its `layers`"),
        ({"strategies": ["fastv"], "sites": {"fastv": {"layers": [-1]}}}, "grid.sites.fastv.0: layers are"),
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
    for name in ("fastv", "uniform", "tome"):  # tome ships with tokenprune: never skipped
        assert sum(f" {name} K=" in line for line in listed) == 6, name  # 2 layers x 3 ratios
    # random also at two more sites: before the language model (K=0) and inside the tower (K=v1)
    assert sum(" random K=" in line for line in listed) == 12
    assert (
        sum(" random K=0 " in line for line in listed) == sum(" random K=v1 " in line for line in listed) == 3
    )
    assert "skipping" not in out.err


def test_strategies_not_installed_are_skipped_with_a_notice(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"grid": {"strategies": ["fastv"], "if_installed": ["not-installed"]}}))
    assert main(["ablate", str(path), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "skipping strategy 'not-installed': not installed" in out.err
    assert [line.split("  ")[-1] for line in out.out.splitlines()[1:]] == ["baseline", "fastv K=2 R=0.5"]


@pytest.mark.parametrize(
    ("page", "run"),
    [
        ("running-an-ablation.md", "ablation-default"),
        ("paper-grid.md", "paper-grid"),
        ("paper-grid-video.md", "paper-grid-video"),
    ],
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


def _toy_llava_prefill_flops(tokens_per_layer: list[int]) -> int:
    """FLOPs of the toy LLaVA's decoder (d=128, 4 heads, 2 kv heads of 32, gated FFN 384) from first
    principles: 2 per multiply-accumulate; q, k, v, o, scores, weighted sum and three FFN matrices."""
    d, heads, kv_heads, head_dim, ffn = 128, 4, 2, 32, 384
    total = 0
    for n in tokens_per_layer:
        projections = 2 * n * d * (2 * heads * head_dim + 2 * kv_heads * head_dim)
        attention = 2 * 2 * n * n * heads * head_dim
        total += projections + attention + 3 * 2 * n * d * ffn
    return total


@pytest.mark.parametrize("run", ["ablation-default", "paper-grid"])
def test_the_committed_flops_follow_the_formula(run):
    """Beside the golden tables: the FLOPs of the committed baseline and fastv rows, counted here.

    A toy prompt is `<s>`, 144 image tokens and the question's words; fastv keeps its budget from
    layer K on. The counts are integers: equal exactly.
    """
    rows = {row["label"]: row for row in read_rows(ROOT / "docs" / "ablation" / run / "results.jsonl")}
    samples = generate_samples("test", rows["baseline"]["samples"])
    tokens = [1 + GRID * GRID + len(s.question.split()) for s in samples]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert rows["baseline"]["prefill_flops"] == pytest.approx(
        mean([_toy_llava_prefill_flops([n] * 4) for n in tokens]), rel=1e-12
    )
    cells = [row for row in rows.values() if row["strategy"] == "fastv"]
    assert cells
    for row in cells:
        stage = row["cell"]["reduction"]["stages"][0]
        layer, kept = stage["layer"], tp.Stage(**stage).kept_count(GRID * GRID)
        removed = GRID * GRID - kept
        expected = mean([_toy_llava_prefill_flops([n] * layer + [n - removed] * (4 - layer)) for n in tokens])
        assert row["prefill_flops"] == pytest.approx(expected, rel=1e-12), row["label"]


PAPER_GRIDS = ("paper-grid", "paper-grid-video")


def test_every_strategy_is_in_a_paper_grid_and_the_video_grid_has_the_references():
    """Each registered strategy runs in the image paper grid or the video one (video-only methods in
    the video grid, which also runs FastV, random and uniform, the image grid's references)."""
    listed = {name: _grid_strategies(name) for name in PAPER_GRIDS}
    assert set().union(*listed.values()) == set(tp.list_strategies())
    assert {"fastv", "random", "uniform", "dycoke"} <= listed["paper-grid-video"]
    assert "vlcache" in listed["paper-grid"]


def _grid_strategies(name: str) -> set[str]:
    """The strategies of the cells of configs/<name>.yaml."""
    config = load_ablation_config(ROOT / "configs" / f"{name}.yaml")
    return {cell.reduction.strategy for cell in expand_grid(config, "data")[1:]}


@torch.no_grad()
@pytest.mark.parametrize(
    ("grid", "limit", "budgets"), [("paper-grid", 3, [16, 32, 48]), ("paper-grid-video", 2, [24, 40, 72])]
)
def test_every_cell_of_a_paper_grid_keeps_its_exact_budget_on_its_toy_model(grid, limit, budgets):
    """configs/<grid>.yaml on its built-in toy: each cell's last event keeps its budget on every sample,
    and the one-stage cells (with dycoke's cache stage) come at the grid's three equal budgets.

    Every cell generates two tokens: a `site: cache` stage prunes the cache before the second."""
    from tokenprune.lab.batches import make_batches
    from tokenprune.lab.bench import open_model

    config = load_ablation_config(ROOT / "configs" / f"{grid}.yaml")
    loaded = open_model(config)
    inputs = make_batches(loaded, load_samples(config.dataset.source, "test", limit), limit)[0].inputs
    layout = loaded.adapter.visual_layout(inputs)
    cells = expand_grid(config)[1:]
    single = [
        c.reduction for c in cells if len(c.reduction.stages) == 1 or c.reduction.stages[-1].site == "cache"
    ]
    assert sorted({_kept(layout, r, r.stages[0]) for r in single}) == budgets
    for cell in cells:
        with tp.attach(loaded.model, cell.reduction) as handle:
            loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
            last = handle.trace[-1]
        assert last.visual_after == [_kept(layout, cell.reduction, cell.reduction.stages[-1])] * limit, (
            cell.label
        )


def _kept(layout: tp.VisualLayout, reduction: tp.ReductionConfig, stage: tp.Stage) -> int:
    """Visual tokens `stage` keeps of the first sample: one count over all of them, or one per frame
    (each grid of each frame; a video's class tokens are grids of one) with `budget: per_frame` and
    in a vision tower (which sees one frame at a time)."""
    frames = layout.frame[0][layout.visual[0]]
    if reduction.budget == "sample" and stage.site != "vision":
        return stage.kept_count(len(frames))
    return sum(stage.kept_count(n) for n in frames.bincount().tolist() if n)


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


def _outputs(logits: list[list[float]], continuations: list[list[int]], reference=None) -> Outputs:
    logprobs = torch.log_softmax(torch.tensor(logits), dim=-1)
    n = len(continuations)
    kl = [0.0] * n if reference is None else first_token_kl(logprobs, reference.logprobs)
    first = logprobs.argmax(dim=-1).tolist()
    return Outputs(
        first_tokens=first,
        first_token_kl=kl,
        continuations=continuations,
        predictions=[""] * n,
        flops=[1] * n,
        tower_flops=None,
        visual_before=[1] * n,
        visual_after=[1] * n,
        logprobs=logprobs,
    )


def test_fidelity_against_the_reference():
    reference = _outputs([[2.0, 0.0], [0.0, 2.0]], [[5, 6], [7]])
    assert fidelity(reference, reference) == {
        "top1_agreement": 1.0,
        "first_token_kl": 0.0,
        "continuation_match": 1.0,
    }
    other = fidelity(_outputs([[2.0, 0.0], [2.0, 0.0]], [[5, 6], [8]], reference), reference)
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


def test_survival_map_of_a_video_shows_its_frames_side_by_side():
    """The toy Video-LLaVA: 8 frames of a 4 x 4 grid (each with a class token, left out) as a 4 x 32 strip."""
    from tokenprune.lab.batches import make_batches
    from tokenprune.lab.loading import load_model

    loaded = load_model("builtin:toy-video-llava")
    inputs = make_batches(loaded, load_samples("builtin:toy-video-vqa", "test", 1), 1)[0].inputs
    first = int(loaded.adapter.visual_layout(inputs).visual[0].nonzero()[0])  # frame 0's class token
    patch = first + 1  # frame 0, row 0, column 0; frame 1's (0, 1): past 16 patches and a class token
    kept = torch.tensor([[0, patch, patch + 18]])
    event = tp.ReductionEvent(0, [150], [3], [136], [2], kept)
    state = survival_map(loaded.adapter, inputs, [event])
    assert state["grid"] == [4, 32] and [i for i, s in enumerate(state["state"]) if s >= 0] == [0, 5]
    assert state["state"][:6] == [0, -1, -1, -1, -1, 5]


def test_the_cache_after_decoding_is_a_column_only_where_a_cell_has_a_cache_stage():
    from tokenprune.lab.tables import markdown_columns

    def row(*sites: str) -> dict:
        return {"cell": {"reduction": {"stages": [{"site": site} for site in sites]}}}

    headers = [
        [c.header for c in markdown_columns(rows)] for rows in ([row("language")], [row("language", "cache")])
    ]
    assert "KV cache KiB per sample after decoding" in set(headers[1]) - set(headers[0])
    assert [h for h in headers[1] if h in headers[0]] == headers[0]


def test_per_frame_keeps_are_checked_against_the_largest_grid_of_a_frame(tmp_path):
    """A video frame's class token is a grid of its own: a per-frame keep caps it at 1, refused only
    when no grid of a frame holds more tokens than the keep."""
    from tokenprune.contracts.layout import Segment, VisualLayout
    from tokenprune.lab.checks import check_batch_keeps

    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"grid": {"strategies": ["uniform"], "keeps": [4]}}))
    cells = expand_grid(load_ablation_config(tmp_path / "grid.yaml"), dataset="d")
    per_frame = [
        replace(c, reduction=c.reduction.model_copy(update={"budget": "per_frame"})) for c in cells[1:]
    ]
    coords = torch.zeros(6, 3, dtype=torch.long)
    frames = [
        Segment(0, torch.tensor([1]), coords[:1], (1, 1, 1)),
        Segment(0, torch.arange(2, 8), coords, (1, 2, 3)),
    ]
    check_batch_keeps(
        tmp_path / "grid.yaml", per_frame, VisualLayout.from_segments(1, 9, frames, torch.device("cpu"))
    )
    with pytest.raises(ConfigError, match=r"keep=4 > the 1 visual tokens it counts from"):
        check_batch_keeps(
            tmp_path / "grid.yaml",
            per_frame,
            VisualLayout.from_segments(1, 9, frames[:1], torch.device("cpu")),
        )


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
    assert baseline["flops_ratio"] == 1.0 and baseline["overhead_s"] is None
    for row in rows:
        assert row["samples"] == 6 and 0 <= row["accuracy_exact"] <= row["accuracy_contains"] <= 1
        assert (row["timing_repeats"], row["timing_decode_tokens"]) == (1, 32)
        assert row["prefill_speedup"] == pytest.approx(row["baseline_prefill_s"] / row["prefill_s"])
        assert row["prefill_spread"] == 0.0  # one repeat: no spread to measure
        assert row["peak_memory_bytes"] is None  # CPU: not measured
        assert row["environment"]["torch"] == torch.__version__ and row["cell"]["seed"] == (
            0 if row["strategy"] == "random" else None
        )
    for row, kept in ((fastv, 72), (uniform, 72), (random, 9)):
        assert row["flops_ratio"] < 1 and row["kv_cache_bytes"] < baseline["kv_cache_bytes"]
        assert (
            row["survival"]["grid"] == [GRID, GRID] and sum(s >= 0 for s in row["survival"]["state"]) == kept
        )
    assert fastv["visual_tokens_after"] == pytest.approx((72 * 5 + 144) / 6)  # sample 2 has two images
    assert (finished_run / "sample.png").exists()


def test_accuracy_recomputed_from_the_rows_answers(finished_run, dataset):
    """The accuracy columns agree with the per-sample answers of the row, scored here on their own."""
    wanted = [json.loads(line)["answer"] for line in dataset.read_text().splitlines()]
    for row in read_rows(finished_run / "results.jsonl"):
        said = [" ".join(p.lower().strip(" .!?").split()) for p in row["predictions"]]
        assert len(said) == row["samples"] == len(wanted)
        assert row["accuracy_exact"] == sum(s == w for s, w in zip(said, wanted, strict=True)) / len(wanted)


@torch.no_grad()
def test_first_token_kl_is_the_kl_of_the_two_models_next_token_distributions(finished_run, checkpoint):
    """KL(unreduced || cell) of the first answer token, from two plain forwards and the formula.

    Float32. `generate` computes the last position alone, a forward every position: the logits
    round differently (~1e-8), hence rel 1e-4 or abs 1e-7 on the mean KL.
    """
    from tokenprune.lab.batches import make_batches
    from tokenprune.lab.bench import open_model
    from tokenprune.lab.datasets import load_samples

    config = load_ablation_config(finished_run.parents[1] / "small.yaml")
    loaded = open_model(config)
    samples = load_samples(config.dataset.source, "test", config.dataset.limit)
    inputs = make_batches(loaded, samples, len(samples))[0].inputs
    full = torch.log_softmax(loaded.model(**inputs).logits[:, -1].float(), dim=-1)
    for row in read_rows(finished_run / "results.jsonl")[1:]:
        cell = {k: v for k, v in row["cell"]["reduction"].items() if k not in ("layer", "ratio", "keep")}
        with tp.attach(loaded.model, tp.ReductionConfig(**cell)):  # from its stages, not the shorthand
            reduced = torch.log_softmax(loaded.model(**inputs).logits[:, -1].float(), dim=-1)
        kl = (full.exp() * (full - reduced)).sum(dim=-1).mean().item()
        assert kl > 0 and row["first_token_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7), row["label"]
        agree = (full.argmax(-1) == reduced.argmax(-1)).float().mean().item()
        assert row["top1_agreement"] == pytest.approx(agree), row["label"]


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
    timing = FAST_TIMING
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
    with pytest.raises(ConfigError, match=r"deep.yaml: grid.sites.random.0.layers: layer\(s\) \[9\] past"):
        run_ablation(config)


def _toy_tower_flops(n: int) -> int:
    """One layer of the toy LLaVA's CLIP tower on n tokens, from first principles (2 per MAC)."""
    d, mlp = 64, 128
    return 2 * n * d * 4 * d + 2 * 2 * n * n * d + 2 * 2 * n * d * mlp


def test_vision_site_and_keep_budgets_run_on_the_builtin_model(tmp_path):
    timing = FAST_TIMING
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
    # the tower (4 CLIP layers, hidden 64, MLP 128, 144 patches + CLS): fastv leaves it whole; visionzip
    # reduces the output of its layer 0, so layers 1-3 run on the 16 kept patches and the class token
    tower = _toy_tower_flops
    assert fastv["baseline_tower_flops"] == fastv["tower_flops"] == 4 * tower(145)
    assert visionzip["tower_flops"] == tower(145) + 3 * tower(17)


@pytest.fixture
def broken_strategy():
    """Registers `broken`: a strategy whose selection breaks the Reducer contract (keeps nothing)."""

    @tp.register_strategy("broken")
    class Broken(tp.Reducer):
        def select(self, view: tp.TokenView) -> torch.Tensor:
            return torch.zeros_like(view.candidates)

    yield "broken"
    STRATEGIES.unregister("broken")


def test_a_failing_cell_is_recorded_with_its_error_and_the_others_run(
    tmp_path, checkpoint, dataset, broken_strategy, capsys
):
    grid = {"strategies": [broken_strategy, "uniform"], "layers": [1], "ratios": [0.5]}
    config = write_config(tmp_path / "failing.yaml", checkpoint, dataset, grid=grid)
    assert main(["ablate", str(config), "--no-report"]) == 2
    err = capsys.readouterr().err
    broken = "StrategyError: strategy 'broken' (broken_strategy.<locals>.Broken): select kept"
    assert f"cell 1 (broken K=1 R=0.5) failed: {broken}" in err
    assert "1 cell(s) failed, recorded with their error" in err and err.rstrip().endswith("broken K=1 R=0.5")
    folder = tmp_path / "runs" / "failing"
    rows = read_rows(folder / "results.jsonl")
    assert [row["label"] for row in rows] == ["baseline", "broken K=1 R=0.5", "uniform K=1 R=0.5"]
    assert rows[1]["error"].startswith(broken) and "accuracy_exact" not in rows[1]
    build_report([folder])  # the measured cells make the tables; the failed one is listed under them
    summary = (folder / "summary.md").read_text()
    assert summary.count("\n| ") == 3 and f"- broken K=1 R=0.5: {broken}" in summary


@pytest.fixture
def raising_strategy():
    """Registers `raising`: uniform selection that raises a plain ValueError (not a TokenPruneError)."""

    @tp.register_strategy("raising")
    class Raising(tp.Reducer):
        def select(self, view: tp.TokenView) -> torch.Tensor:
            raise ValueError("samples hold different numbers of images")

    yield "raising"
    STRATEGIES.unregister("raising")


def test_any_exception_of_a_cell_is_recorded_and_a_rerun_tries_the_cell_again(
    tmp_path, checkpoint, dataset, raising_strategy, capsys
):
    grid = {"strategies": [raising_strategy], "layers": [1], "ratios": [0.5]}
    config = write_config(
        tmp_path / "raising.yaml",
        checkpoint,
        dataset,
        grid=grid,
        dataset={"source": str(dataset), "limit": 2},
    )
    with pytest.raises(tp.TokenPruneError, match="1 cell"):
        run_ablation(config)
    results = tmp_path / "runs" / "raising" / "results.jsonl"
    assert read_rows(results)[1]["error"] == "ValueError: samples hold different numbers of images"
    assert "Traceback" in capsys.readouterr().err  # an unexpected error shows where it came from
    with pytest.raises(tp.TokenPruneError):
        run_ablation(config)
    assert "2 cells, 1 already finished" in capsys.readouterr().err  # the failed cell ran again
    assert [row.get("error") is None for row in merge_rows([results])] == [True, False]


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


# -- timings a paper can print ---------------------------------------------------------------------


class _Clock:
    """A fake `time.perf_counter`: each reading advances by the next step of `steps` (seconds)."""

    def __init__(self, steps: list[float]) -> None:
        self.now, self.steps = 0.0, iter(steps)

    def __call__(self) -> float:
        self.now += next(self.steps)
        return self.now


def test_a_plain_call_is_timed_with_the_device_synchronised_around_it(monkeypatch):
    """`elapsed`: the device's queued work is waited for before each clock reading."""
    from tokenprune.lab import timing

    events: list[str] = []
    clock = _Clock([10.0, 0.25])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append("clock") or clock())
    seconds = timing.elapsed(lambda: events.append("run"), lambda: events.append("sync"))
    assert seconds == pytest.approx(0.25, abs=1e-12)
    assert events == ["sync", "clock", "run", "sync", "clock"]


def test_the_benchmarks_clock_synchronises_cuda(monkeypatch):
    """benchmarks/common.py times with the lab's clock: on a CUDA machine it waits for the device."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import common

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    assert common.elapsed(lambda: events.append("run")) >= 0.0
    assert events == ["sync", "run", "sync"]


def test_generation_is_timed_step_by_step(monkeypatch):
    """Prefill: from the call to the first token's logits; decode: first to last logits, per step."""
    from tokenprune.lab import timing

    class Model:
        def generate(self, logits_processor, max_new_tokens, **_):
            for _ in range(max_new_tokens):
                logits_processor[0](None, torch.zeros(1, 4))

    # start reading, then 4 step readings: prefill 0.5 s, then decode steps of 0.1, 0.2, 0.3 s
    monkeypatch.setattr(timing.time, "perf_counter", _Clock([10.0, 0.5, 0.1, 0.2, 0.3]))
    times = timing.time_generation(Model(), {}, 4, lambda: None)
    assert times.steps == 4
    assert times.prefill_s == pytest.approx(0.5, abs=1e-12)
    assert times.decode_s_per_token == pytest.approx(0.2, abs=1e-12)


def _speed(prefill: tuple[list[float], list[float]], decode: tuple[list[float], list[float]], steps=32):
    from tokenprune.lab.speed import PairedSpeed
    from tokenprune.lab.timing import summarize

    return PairedSpeed(summarize(*prefill), summarize(*decode), [steps] * 2 * len(prefill[0]))


def test_speed_ups_are_medians_of_paired_ratios_with_their_spread():
    from tokenprune.lab.bench import timing_fields

    # the machine slows down during the run: per-pair ratios stay 0.5, a ratio of medians would not
    speed = _speed(([1.0, 2.0, 4.0], [0.5, 1.0, 2.0]), ([0.01, 0.02, 0.03], [0.01, 0.02, 0.03]))
    fields = timing_fields(speed, 32)
    assert fields["prefill_speedup"] == 2.0 and fields["prefill_spread"] == 0.0
    assert fields["decode_speedup"] == 1.0 and fields["timing_flags"] == []
    assert (fields["prefill_s"], fields["baseline_prefill_s"]) == (1.0, 2.0)


def test_a_noisy_or_bad_measurement_is_flagged_never_clamped():
    from tokenprune.lab.bench import timing_fields

    noisy = _speed(([1.0] * 4, [0.5, 0.7, 0.5, 0.7]), ([0.01] * 4, [0.01] * 4))
    assert timing_fields(noisy, 32)["timing_flags"] == ["prefill: spread 33% > 10%"]  # IQR 0.2 / 0.6
    calm = _speed(([1.0] * 4, [0.5, 0.52, 0.5, 0.52]), ([0.01] * 4, [0.01] * 4))
    assert timing_fields(calm, 32)["timing_flags"] == []  # spread 4%
    negative = _speed(([1.0], [0.5]), ([0.01], [-0.002]), steps=20)
    fields = timing_fields(negative, 32)
    assert fields["decode_s_per_token"] == -0.002  # as measured
    assert fields["timing_flags"] == [
        "decode: a time that is not positive and finite",
        "decode: a generation made 20 of 32 tokens",
    ]


def test_decode_is_timed_over_at_least_32_tokens(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump({"timing": {"decode_tokens": 8}, "grid": {"strategies": ["fastv"]}}))
    with pytest.raises(
        ConfigError, match=r"timing\.decode_tokens: Input should be greater than or equal to 32"
    ):
        load_ablation_config(path)


@pytest.fixture
def slow_strategy():
    """Registers `slow`: uniform's selection after 30 ms of sleep (a strategy's own cost, known)."""
    uniform = tp.strategy_class("uniform")

    @tp.register_strategy("slow")
    class Slow(uniform):
        def select(self, view: tp.TokenView) -> torch.Tensor:
            time.sleep(0.03)
            return super().select(view)

    yield "slow"
    STRATEGIES.unregister("slow")


@torch.no_grad()
def test_overhead_is_the_time_the_strategy_spends_selecting(slow_strategy):
    from tokenprune.lab.speed import footprint

    model = toy_llava(ToySize(grid=4, patch=4, vocab=64), seed=1)
    inputs = {
        "input_ids": torch.tensor([[5, *[IMAGE_TOKEN_ID] * 16, 6]]),
        "pixel_values": torch.zeros(1, 3, 16, 16),
    }
    start = time.perf_counter()
    cell = footprint(model, inputs, tp.ReductionConfig(strategy=slow_strategy, layer=1, ratio=0.5), 2)
    took = time.perf_counter() - start
    assert 0.03 <= cell.overhead_s < 0.03 + took / 3  # one selection, in the third of three passes
    assert footprint(model, inputs, None, 2).overhead_s is None


# -- memory ---------------------------------------------------------------------------------------


def test_batches_stay_on_the_cpu_whatever_the_models_device(checkpoint, dataset):
    from tokenprune.lab.batches import make_batches
    from tokenprune.lab.loading import Loaded, load_model

    loaded = load_model(str(checkpoint))
    on_meta = Loaded(torch.nn.Linear(1, 1, device="meta"), loaded.processor, "{question}", 2, loaded.adapter)
    batches = make_batches(on_meta, jsonl_samples(dataset), 4)
    assert {t.device.type for b in batches for t in b.inputs.values()} == {"cpu"}
    assert {t.device.type for t in batches[0].on(torch.device("meta")).values()} == {"meta"}


@torch.no_grad()
def test_a_cell_keeps_numbers_per_sample_and_nothing_of_its_generations(checkpoint, dataset):
    """Reduced cells keep no [N, V] log-probabilities, and no tensor of a generation outlives it."""
    import gc
    import weakref

    from tokenprune.lab.batches import make_batches
    from tokenprune.lab.loading import load_model
    from tokenprune.lab.metrics import evaluate

    loaded = load_model(str(checkpoint))
    loaded.max_new_tokens = 2
    batches = make_batches(loaded, jsonl_samples(dataset), 4)
    reference = evaluate(loaded, batches, None)
    assert reference.logprobs.shape == (6, 64) and reference.logprobs.device.type == "cpu"
    generated: list[weakref.ref] = []
    generate = loaded.model.generate

    def watched(**kwargs):
        out = generate(**kwargs)
        generated.extend(weakref.ref(t) for t in (out.sequences, *out.logits))
        return out

    loaded.model.generate = watched
    cell = evaluate(
        loaded, batches, tp.ReductionConfig(strategy="uniform", layer=1, ratio=0.5), reference.logprobs
    )
    gc.collect()
    assert cell.logprobs is None and len(cell.first_token_kl) == len(cell.first_tokens) == 6
    assert not any(isinstance(v, torch.Tensor) for v in vars(cell).values())
    assert len(generated) > 2 and all(ref() is None for ref in generated)


# -- datasets and models --------------------------------------------------------------------------


def test_an_empty_saved_dataset_is_a_config_error(tmp_path):
    import datasets

    empty = datasets.Dataset.from_dict({"image": [], "question": [], "answers": []})
    datasets.DatasetDict({"test": empty}).save_to_disk(tmp_path / "saved")
    with pytest.raises(
        ConfigError, match=r"saved has no samples in a split \(a save_to_disk split of 0 rows"
    ):
        load_samples(str(tmp_path / "saved"), "test", 4)


def test_one_builtin_namespace_serves_run_and_ablate(tmp_path, capsys):
    from tokenprune.lab.loading import BUILTIN_MODELS, load_model

    with pytest.raises(
        ConfigError,
        match="unknown builtin model 'builtin:nope'; known: builtin:toy-llava, builtin:tiny-llava",
    ):
        load_model("builtin:nope")
    assert set(BUILTIN_MODELS) == {"builtin:toy-llava", "builtin:tiny-llava", "builtin:toy-video-llava"}
    run = {"model": "builtin:toy-llava", "reduction": {"strategy": "fastv", "layer": 2, "ratio": 0.5}}
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({**run, "text_tokens": 4, "max_new_tokens": 2, "repeats": 1})
    )
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    assert "(visual 144 -> 72)" in capsys.readouterr().out
    ablation = {
        "model": {"source": "builtin:tiny-llava"},
        "dataset": {"limit": 2},
        "grid": {"strategies": ["fastv"]},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**ablation, "output": str(tmp_path)}))
    assert main(["ablate", str(tmp_path / "tiny.yaml")]) == 2
    assert "has no processor" in capsys.readouterr().err


def test_the_default_ablation_runs_end_to_end_on_a_tiny_limit(tmp_path, monkeypatch):
    """configs/ablation-default.yaml as shipped, on 2 samples, one timing round of 32 decode tokens.

    The load of this machine's other processes is not under test: their flag is off.
    """
    monkeypatch.setattr(speed, "OTHERS_CORES_LIMIT", math.inf)
    config = yaml.safe_load((ROOT / "configs" / "ablation-default.yaml").read_text())
    config |= {"output": str(tmp_path), "dataset": {**config["dataset"], "limit": 2}, "batch_size": 2}
    config["timing"] |= {"warmup": 0, "repeats": 1, "batch_size": 2}
    (tmp_path / "ablation-default.yaml").write_text(yaml.safe_dump(config))
    assert main(["ablate", str(tmp_path / "ablation-default.yaml")]) == 0
    rows = read_rows(tmp_path / "ablation-default" / "results.jsonl")
    assert len(rows) == 1 + 5 * 6 and not any("error" in row for row in rows)
    assert all(row["timing_decode_tokens"] == 32 and row["timing_flags"] == [] for row in rows)
    assert (tmp_path / "ablation-default" / "summary.md").read_text().count("\n| ") == 1 + 1 + 5 * 6


# -- re-measuring, reports of partial and mixed rows --------------------------------------------------


def _dry_run_summary(config: Path, capsys) -> str:
    """The first line of `ablate --dry-run`: `N cells (M finished)`."""
    assert main(["ablate", str(config), "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()[0]


def test_rows_timed_otherwise_are_measured_again_and_replaced(tmp_path, checkpoint, dataset, capsys):
    grid = {"strategies": ["uniform"], "layers": [1], "ratios": [0.5]}
    config = write_config(
        tmp_path / "retime.yaml", checkpoint, dataset, grid=grid, dataset={"source": str(dataset), "limit": 2}
    )
    assert main(["ablate", str(config), "--no-report"]) == 0
    assert _dry_run_summary(config, capsys) == "2 cells (2 finished)"
    results = tmp_path / "runs" / "retime" / "results.jsonl"
    rows = read_rows(results)
    old = [{k: v for k, v in row.items() if not k.startswith("timing")} for row in rows]
    results.write_text("".join(json.dumps(row) + "\n" for row in old))  # rows of the unpaired method
    assert _dry_run_summary(config, capsys) == "2 cells (0 finished)"
    results.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "timing": {**settings.get("timing", {}), "repeats": 2}}))
    assert _dry_run_summary(config, capsys) == "2 cells (0 finished)"  # other timing settings
    assert main(["ablate", str(config), "--no-report"]) == 0
    merged = merge_rows([results])
    assert [row["key"] for row in merged] == [row["key"] for row in rows]  # replaced, not duplicated
    assert [row["timing_repeats"] for row in merged] == [2, 2]


def test_the_report_says_when_rows_were_timed_by_different_methods(finished_run, tmp_path):
    rows = read_rows(finished_run / "results.jsonl")
    rows[2] = {k: v for k, v in rows[2].items() if not k.startswith("timing")}  # an unpaired row
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_report([tmp_path])
    footnote = (tmp_path / "summary.md").read_text()
    assert "mixed timing methods" in footnote
    assert "1 cell: medians on the first batch" in footnote and "3 cells: on the timing batch" in footnote


def test_speedups_that_are_not_finite_leave_blanks_not_a_crash(finished_run, tmp_path):
    rows = read_rows(finished_run / "results.jsonl")
    rows[1] = {**rows[1], "prefill_speedup": None, "decode_speedup": None}  # as runner writes inf/NaN
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_report([tmp_path])
    table = (tmp_path / "summary.md").read_text().splitlines()
    headers = [c.strip() for c in table[0].split("|")[1:-1]]
    line = next(text for text in table if text.startswith(f"| {rows[1]['label']} |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert (
        cells[headers.index("prefill speed-up (x)")] == ""
        and cells[headers.index("decode speed-up (x)")] == ""
    )


def test_timing_flags_are_plain_text_in_the_csv(finished_run, tmp_path):
    rows = read_rows(finished_run / "results.jsonl")
    rows[0] = {**rows[0], "timing_flags": []}
    rows[1] = {**rows[1], "timing_flags": ["prefill: spread 12% > 10%", "decode: spread 30% > 10%"]}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_report([tmp_path])
    with (tmp_path / "summary.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert table[1]["timing_flags"] == "prefill: spread 12% > 10%; decode: spread 30% > 10%"
    assert table[0]["timing_flags"] == ""


def test_a_failed_cell_still_gets_the_report_then_exit_status_2(
    tmp_path, checkpoint, dataset, broken_strategy, capsys
):
    grid = {"strategies": [broken_strategy, "uniform"], "layers": [1], "ratios": [0.5]}
    config = write_config(
        tmp_path / "partial.yaml",
        checkpoint,
        dataset,
        grid=grid,
        dataset={"source": str(dataset), "limit": 2},
    )
    assert main(["ablate", str(config)]) == 2
    err = capsys.readouterr().err.rstrip().splitlines()
    assert err[-1].startswith("tokenprune: error: 1 cell(s) failed") and err[-1].endswith("broken K=1 R=0.5")
    folder = tmp_path / "runs" / "partial"
    summary = (folder / "summary.md").read_text()
    assert summary.count("\n| ") == 3 and "- broken K=1 R=0.5: StrategyError" in summary  # rule + 2 rows
    assert (folder / "speedup-vs-flops-bound.png").exists()
