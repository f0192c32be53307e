"""Per-sample predictions in the rows, the statistics on them, the tables that show them, `report --samples`.

The statistics are checked on crafted right/wrong vectors against values worked out by hand (McNemar's
exact p from binomial sums, the mean and standard deviation over seeds) and against the exact
bootstrap distribution of a mean (enumerated from the multinomial, not sampled). The per-sample
log-probabilities are checked against a plain forward of the built-in toy model.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import yaml

import tokenprune as tp
from tokenprune.errors import ConfigError
from tokenprune.lab.batches import answer_token, make_batches
from tokenprune.lab.cli import main
from tokenprune.lab.datasets import load_samples
from tokenprune.lab.loading import load_model
from tokenprune.lab.metrics import Outputs, accuracy, answer_logprobs, evaluate, exact_matches
from tokenprune.lab.predictions import SamplePredictions, find_row, prediction_fields, sample_listing
from tokenprune.lab.results import read_rows
from tokenprune.lab.stats import Spread, compare, mcnemar_exact, paired_bootstrap, spread
from tokenprune.lab.tables import seed_groups, write_tables

FAST_TIMING = {"warmup": 0, "repeats": 1, "decode_tokens": 32, "batch_size": 4}


def _vectors(only_reference: int, only_other: int, both: int = 0, neither: int = 0) -> tuple[list, list]:
    """Right/wrong of two cells on the same samples, with the given concordant and discordant counts."""
    reference = [True] * only_reference + [False] * only_other + [True] * both + [False] * neither
    other = [False] * only_reference + [True] * only_other + [True] * both + [False] * neither
    return reference, other


# -- statistics on crafted vectors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("only_reference", "only_other", "p_value"),
    [
        (1, 9, 2 * (1 + 10) / 2**10),  # P(X <= 1) + P(X >= 9) of Binomial(10, 1/2)
        (0, 6, 2 / 2**6),  # both tails of Binomial(6, 1/2) at their ends
        (3, 3, 1.0),  # balanced: no evidence either way
        (0, 0, 1.0),  # no discordant sample at all
        (2, 5, 2 * (1 + 7 + 21) / 2**7),
    ],
)
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_samples(only_reference, only_other, p_value):
    reference, other = _vectors(only_reference, only_other, both=7, neither=4)  # concordant: no effect
    test = mcnemar_exact(reference, other)
    assert (test.only_reference, test.only_other) == (only_reference, only_other)
    assert test.p_value == pytest.approx(p_value, rel=1e-12)


def test_mcnemar_refuses_vectors_of_different_lengths():
    with pytest.raises(ValueError, match="differ in number: 2 and 3"):
        mcnemar_exact([True, False], [True, False, True])


def _exact_bootstrap_quantiles(up: int, down: int, n: int, confidence: float) -> tuple[float, float]:
    """The quantiles of the exact bootstrap distribution of the mean of `up` +1s, `down` -1s and zeros.

    A resample's counts (a, b, rest) of the +1s, -1s and 0s are Multinomial(n; up/n, down/n, rest/n);
    its mean is (a - b) / n. Enumerated over every (a, b), not sampled.
    """
    probabilities = [up / n, down / n, (n - up - down) / n]
    mass: dict[int, float] = {}
    for a in range(n + 1):
        for b in range(n + 1 - a):
            p = scipy.stats.multinomial.pmf([a, b, n - a - b], n, probabilities)
            mass[a - b] = mass.get(a - b, 0.0) + p
    values = sorted(mass)
    cumulative = np.cumsum([mass[v] for v in values])
    tail = (1 - confidence) / 2
    low = values[int(np.searchsorted(cumulative, tail))]
    high = values[int(np.searchsorted(cumulative, 1 - tail))]
    return low / n, high / n


def test_the_paired_bootstrap_interval_is_the_exact_bootstraps_within_one_step():
    """20 samples only the other got right, 10 only the reference, 70 alike: difference +0.1.

    The Monte Carlo percentiles of 10,000 resamples lie within one step (1/n = 0.01) of the exact
    bootstrap distribution's quantiles.
    """
    reference, other = _vectors(only_reference=10, only_other=20, both=40, neither=30)
    interval = paired_bootstrap([float(x) for x in reference], [float(x) for x in other])
    low, high = _exact_bootstrap_quantiles(up=20, down=10, n=100, confidence=0.95)
    assert interval.estimate == pytest.approx(0.1, abs=1e-12)
    assert interval.low == pytest.approx(low, abs=0.01 + 1e-9)
    assert interval.high == pytest.approx(high, abs=0.01 + 1e-9)
    assert interval.low < 0.1 < interval.high
    assert paired_bootstrap(reference, other) == interval  # seeded: the same rows, the same interval


@pytest.mark.parametrize(
    ("reference", "other", "value"), [([1, 1, 0], [1, 1, 0], 0.0), ([1, 1], [0, 0], -1.0)]
)
def test_a_difference_the_same_on_every_sample_has_a_zero_width_interval(reference, other, value):
    interval = paired_bootstrap(reference, other)
    assert (interval.estimate, interval.low, interval.high) == (value, value, value)


def test_a_bootstrap_of_no_samples_is_refused():
    with pytest.raises(ValueError, match="at least one sample"):
        paired_bootstrap([], [])


def test_spread_is_mean_sample_std_and_count():
    three = spread([0.5, 0.7, 0.6])
    assert (three.mean, three.std, three.n) == (pytest.approx(0.6), pytest.approx(0.1), 3)
    assert spread([0.4]) == Spread(0.4, None, 1)


def _predictions(correct: list[bool], ids: list[str] | None = None) -> SamplePredictions:
    """Per-sample columns with the given right/wrong (answers `a`, predictions `a` or `b`)."""
    ids = ids or [f"s{i}" for i in range(len(correct))]
    said = ["a" if right else "b" for right in correct]
    return SamplePredictions(
        ids, [f"q{i}" for i in ids], [["a"]] * len(ids), said, correct, [None] * len(ids)
    )


def test_seeds_enter_the_bootstrap_averaged_per_sample_and_mcnemar_only_with_one_seed():
    reference = _predictions([True, True, False, False])
    seeds = [_predictions([True, False, False, False]), _predictions([True, True, True, False])]
    several = compare([reference], seeds)
    assert several.difference == 0.0 and several.mcnemar is None  # per sample [1, .5, .5, 0] - [1, 1, 0, 0]
    assert several.interval is not None and several.interval.low < 0 < several.interval.high
    one = compare([reference], seeds[:1], interval=False)
    assert one.difference == -0.25 and one.interval is None
    assert (one.mcnemar.only_reference, one.mcnemar.only_other, one.mcnemar.p_value) == (1, 0, 1.0)


def test_cells_on_other_samples_are_not_compared():
    with pytest.raises(ValueError, match="not run on the same samples"):
        compare([_predictions([True], ["x"])], [_predictions([True], ["y"])])


# -- per-sample columns of a row --------------------------------------------------------------------


def test_exact_matches_are_what_accuracy_counts():
    predictions, answers = (
        ["The Red.", "reddish", "blue", "an apple"],
        [["red"], ["red"], ["red"], ["apple", "x"]],
    )
    right = exact_matches(predictions, answers)
    assert right == [True, False, False, True]
    assert accuracy(predictions, answers)["accuracy_exact"] == sum(right) / 4


def test_answer_logprobs_pick_each_samples_token_and_none_outside_the_vocabulary():
    logprobs = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), dim=-1)
    picked = answer_logprobs(logprobs, [2, 0, None])
    assert picked[:2] == [pytest.approx(logprobs[0, 2].item()), pytest.approx(logprobs[1, 0].item())]
    assert picked[2] is None and answer_logprobs(logprobs, [3, 1, 1])[0] is None


@pytest.fixture(scope="module")
def toy():
    """The built-in toy LLaVA (trained: it answers the toy task) and 6 samples of the toy task."""
    loaded = load_model("builtin:toy-llava")
    return loaded, load_samples("builtin:toy-vqa", "test", 6)


def test_the_answer_token_is_the_answers_first_token_as_the_prompt_continues(toy):
    loaded, samples = toy
    tokenizer = loaded.processor.tokenizer
    batch = make_batches(loaded, samples, 6)[0]
    assert batch.ids == [s.id for s in samples] and batch.questions == [s.question for s in samples]
    expected = [tokenizer.convert_tokens_to_ids(s.answers[0]) for s in samples]  # one word, one token here
    assert batch.answer_tokens == expected
    assert answer_token(loaded.processor, "what colour is", "") is None  # an answer that adds no token
    assert answer_token(loaded.processor, "what colour is\n", "red") == tokenizer.convert_tokens_to_ids("red")


@torch.no_grad()
def test_answer_logprobs_are_the_first_steps_log_probabilities_of_the_answer_tokens(toy):
    """Against a plain forward of the prompt, unreduced and reduced (float32: rel 1e-4, abs 1e-5)."""
    loaded, samples = toy
    loaded.max_new_tokens = 1
    batches = make_batches(loaded, samples, 4)  # two batches: dataset order is kept across them
    reference = evaluate(loaded, batches, None)
    reduction = tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.75)
    reduced = evaluate(loaded, batches, reduction, reference.logprobs)
    whole = make_batches(loaded, samples, 6)[0]
    tokens = torch.tensor(whole.answer_tokens)
    rows = torch.arange(len(samples))
    full = torch.log_softmax(loaded.model(**whole.inputs).logits[:, -1].float(), dim=-1)[rows, tokens]
    with tp.attach(loaded.model, reduction):
        cut = torch.log_softmax(loaded.model(**whole.inputs).logits[:, -1].float(), dim=-1)[rows, tokens]
    assert reference.answer_logprobs == pytest.approx(full.tolist(), rel=1e-4, abs=1e-5)
    assert reduced.answer_logprobs == pytest.approx(cut.tolist(), rel=1e-4, abs=1e-5)
    assert min(reference.answer_logprobs) > math.log(0.5)  # the trained toy is sure of the right answer


def test_prediction_fields_hold_the_columns_in_dataset_order(toy):
    loaded, samples = toy
    batches = make_batches(loaded, samples, 4)
    said = [s.answers[0] if i % 2 else "nothing" for i, s in enumerate(samples)]
    logprobs = [-0.1234567, float("-inf"), None, -2.0, -1e-9, -3.3333333]
    ones = [1] * 6
    outputs = Outputs(
        first_tokens=ones,
        first_token_kl=[0.0] * 6,
        continuations=[[]] * 6,
        predictions=said,
        flops=ones,
        tower_flops=None,
        visual_before=ones,
        visual_after=ones,
        answer_logprobs=logprobs,
    )
    fields = prediction_fields(outputs, batches)
    assert fields["predictions"] == said
    columns = fields["per_sample"]
    assert columns["id"] == [s.id for s in samples] and columns["question"] == [s.question for s in samples]
    assert columns["answers"] == [s.answers for s in samples]
    assert columns["correct"] == [False, True, False, True, False, True]
    assert columns["answer_logprob"] == [-0.12346, None, None, -2.0, -0.0, -3.33333]
    assert json.loads(json.dumps(fields)) == fields  # a row is JSON


# -- tables --------------------------------------------------------------------------------------


def _row(index: int, label: str, correct: list[bool] | None, seed: int = 0, **fields) -> dict:
    """A measured row as the runner writes it, with per-sample predictions when `correct` is given."""
    strategy = label.split()[0]
    reduction = None if strategy == "baseline" else {"strategy": strategy, "params": {"seed": seed}}
    row = {
        "key": f"{label}-{seed}",
        "index": index,
        "label": label,
        "strategy": strategy,
        "seed": seed,
        "cell": {"reduction": reduction, "seed": seed},
        "samples": 8,
        "visual_tokens_before": 144,
        "visual_tokens_after": 36,
        "accuracy_exact": 0.5 if correct is None else sum(correct) / len(correct),
        "accuracy_contains": 0.5,
        "top1_agreement": 0.5,
        "first_token_kl": 1.0,
        "continuation_match": 0.5,
        "prefill_flops": 2e8,
        "baseline_prefill_flops": 3e8,
        "flops_ratio": 2 / 3,
        "tower_flops": 3e7,
        "prefill_s": 0.1,
        "prefill_speedup": 1.5,
        "prefill_spread": 0.02,
        "decode_s_per_token": 0.004,
        "decode_speedup": 1.0,
        "decode_spread": 0.03,
        "timing_repeats": 5,
        "timing_decode_tokens": 32,
        "timing_flags": [],
        "timing": {"batch_size": 16, "method": "x"},
        "kv_cache_bytes": 192 * 1024,
        "overhead_s": 0.001,
        "environment": {"device": "cpu"},
        **fields,
    }
    if correct is not None:
        ids = [f"s{i}" for i in range(len(correct))]
        row["predictions"] = ["a" if right else "b" for right in correct]
        row["per_sample"] = {
            "id": ids,
            "question": [f"question {i}" for i in ids],
            "answers": [["a"]] * len(ids),
            "correct": correct,
            "answer_logprob": [-0.5] * len(ids),
        }
    return row


BASELINE = [True] * 8
FASTV = [True, True, True, False, False, False, False, False]


def _rows() -> list[dict]:
    """A baseline, fastv (one seed), random (two seeds), an old row without predictions, a failed cell."""
    return [
        _row(0, "baseline", BASELINE, flops_ratio=1.0, prefill_flops=3e8),
        _row(1, "fastv K=2 R=0.75", FASTV, tower_flops=None),
        _row(2, "random K=2 R=0.75 seed=0", [True] * 4 + [False] * 4, seed=0, timing_flags=["noisy"]),
        _row(3, "random K=2 R=0.75 seed=1", [True] * 6 + [False] * 2, seed=1, timing_flags=["noisy"]),
        _row(4, "uniform K=2 R=0.75", None),
        {
            "key": "broken",
            "index": 5,
            "label": "tome K=2 R=0.75",
            "strategy": "tome",
            "error": "ValueError: x",
        },
    ]


def _markdown_table(text: str) -> list[dict[str, str]]:
    """The lines of the summary table as {header: cell}."""
    lines = [line for line in text.split("\n\n")[0].splitlines() if line.startswith("|")]
    split = lambda line: [cell.strip() for cell in line.strip("|").split("|")]  # noqa: E731
    headers = split(lines[0])
    return [dict(zip(headers, split(line), strict=True)) for line in lines[2:]]


def test_seeds_of_one_cell_group_together_and_other_cells_stay_apart():
    groups = seed_groups([row for row in _rows() if "error" not in row])
    assert [[row["index"] for row in group] for group in groups] == [[0], [1], [2, 3], [4]]


def test_the_summary_shows_differences_tests_and_spreads_with_units_and_a_legend(tmp_path):
    write_tables(_rows(), tmp_path)
    text = (tmp_path / "summary.md").read_text()
    table = {line["cell"]: line for line in _markdown_table(text)}
    assert list(table) == ["baseline", "fastv K=2 R=0.75", "random K=2 R=0.75", "uniform K=2 R=0.75"]
    delta, p = "Δ EM vs baseline (pp, 95% CI)", "McNemar p"
    assert table["baseline"][delta] == "(baseline)" and table["baseline"][p] == ""
    fastv = compare([_predictions(BASELINE)], [_predictions(FASTV)])
    low, high = 100 * fastv.interval.low, 100 * fastv.interval.high
    assert table["fastv K=2 R=0.75"][delta] == f"-62.5 [{low:+.1f}, {high:+.1f}]"
    assert table["fastv K=2 R=0.75"][p] == f"{2 / 2**5:.2g}"  # 5 discordant, all one way
    random = table["random K=2 R=0.75"]
    assert random["accuracy EM (%)"] == f"62.5 ± {100 * np.std([0.5, 0.75], ddof=1):.1f} (n=2)"
    assert random[delta].startswith("-37.5 [") and random[p] == ""  # several seeds: no McNemar
    assert random["flag"] == "noisy"  # each flag once
    assert table["uniform K=2 R=0.75"][delta] == "" and "predictions in the rows" in text
    assert "uniform K=2 R=0.75." in text  # named in the note
    # units: the timing batch in the headers, total FLOPs with the tower, blank where it is not counted
    assert (
        "prefill ms per batch of 8" in table["baseline"]
        and "decode ms per token (batch of 8)" in table["baseline"]
    )
    assert table["baseline"]["total GFLOPs per sample"] == "0.33"
    assert table["fastv K=2 R=0.75"]["total GFLOPs per sample"] == ""
    assert table["random K=2 R=0.75"]["total GFLOPs per sample"] == "0.23"
    legend = text.split("Columns (")[1]
    for header in table["baseline"]:
        assert f"- **{header}**: " in legend
    assert "10,000 resamples" in legend and "- tome K=2 R=0.75: ValueError: x" in text


def test_the_timing_batch_in_the_headers_is_what_every_row_was_timed_on(tmp_path):
    rows = [_row(0, "baseline", BASELINE, timing={"batch_size": 4}), _row(1, "fastv K=2 R=0.75", FASTV)]
    write_tables(rows, tmp_path)
    headers = _markdown_table((tmp_path / "summary.md").read_text())[0]
    assert "prefill ms per timing batch" in headers  # 4 and 8 samples: no one size to print


def test_the_csv_keeps_every_row_and_what_the_report_derives(tmp_path):
    write_tables(_rows(), tmp_path)
    lines = {line["label"]: line for line in csv.DictReader((tmp_path / "summary.csv").open())}
    assert len(lines) == 6 and lines["tome K=2 R=0.75"]["error"] == "ValueError: x"
    fastv, seed0 = lines["fastv K=2 R=0.75"], lines["random K=2 R=0.75 seed=0"]
    assert float(fastv["accuracy_exact_diff"]) == -0.625 and float(fastv["mcnemar_p"]) == 2 / 2**5
    assert float(fastv["accuracy_exact_diff_low"]) < -0.625 < float(fastv["accuracy_exact_diff_high"])
    assert fastv["total_flops"] == "" and float(lines["baseline"]["total_flops"]) == 3.3e8
    # each seed against the baseline on its own; the seeds' spread on both of their lines
    assert float(seed0["accuracy_exact_diff"]) == -0.5 and float(seed0["mcnemar_p"]) == 2 / 2**4
    assert seed0["seeds"] == "2" and float(seed0["accuracy_exact_seed_std"]) == pytest.approx(
        np.std([0.5, 0.75], ddof=1)
    )
    assert lines["uniform K=2 R=0.75"]["accuracy_exact_diff"] == "" and lines["baseline"]["mcnemar_p"] == ""


def test_comparisons_pair_every_two_cells_with_predictions(tmp_path):
    write_tables(_rows(), tmp_path)
    pairs = list(csv.DictReader((tmp_path / "comparisons.csv").open()))
    assert [(p["a"], p["b"]) for p in pairs] == [
        ("baseline", "fastv K=2 R=0.75"),
        ("baseline", "random K=2 R=0.75"),
        ("fastv K=2 R=0.75", "random K=2 R=0.75"),
    ]
    fastv_random = pairs[2]
    assert float(fastv_random["difference"]) == pytest.approx(0.625 - 0.375)
    assert (
        fastv_random["mcnemar_p"] == ""
        and fastv_random["b_keys"] == "random K=2 R=0.75 seed=0-0 random K=2 R=0.75 seed=1-1"
    )
    assert (pairs[0]["only_a_right"], pairs[0]["only_b_right"], float(pairs[0]["mcnemar_p"])) == (
        "5",
        "0",
        2 / 2**5,
    )


# -- finding and listing a cell's samples -------------------------------------------------------------


def test_a_cell_is_found_by_key_label_or_index():
    rows = _rows()
    assert find_row(rows, "fastv K=2 R=0.75-0")["index"] == 1
    assert find_row(rows, "fastv K=2 R=0.75")["index"] == 1
    assert find_row(rows, "3")["label"] == "random K=2 R=0.75 seed=1"
    with pytest.raises(ConfigError, match=r"no measured cell 'fastv'.*1: fastv K=2 R=0\.75"):
        find_row(rows, "fastv")
    with pytest.raises(ConfigError, match="no measured cell '5'"):  # the failed cell has no measurement
        find_row(rows, "5")
    with pytest.raises(ConfigError, match="names 2 rows"):
        find_row([*rows, {**rows[1], "key": "other"}], "1")


def test_the_listing_names_the_wrong_samples_and_those_right_where_the_baseline_was_wrong():
    baseline = _row(0, "baseline", [True, True, False, False])
    cell = _row(1, "fastv K=2 R=0.75", [False, True, True, False])
    baseline["predictions"][2] = "zebra"
    text = sample_listing([baseline, cell], "1")
    wrong, gained = text.split("\n\n")
    assert (
        wrong.splitlines()[0]
        == "fastv K=2 R=0.75 (cell 1, key fastv K=2 R=0.75-0): 2 of 4 answers wrong (exact match)"
    )
    assert wrong.splitlines()[1].split() == ["id", "question", "prediction", "reference"]
    assert [line.split()[0] for line in wrong.splitlines()[2:]] == ["s0", "s3"]
    assert wrong.splitlines()[2].split() == ["s0", "question", "s0", "b", "a"]
    assert gained.splitlines()[0] == "right where the baseline was wrong: 1"
    assert gained.splitlines()[2].split() == ["s2", "question", "s2", "a", "a", "zebra"]


def test_a_row_without_predictions_cannot_be_listed():
    with pytest.raises(ConfigError, match=r"has no per-sample predictions.*measure it again"):
        sample_listing(_rows(), "uniform K=2 R=0.75")


# -- a whole run -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The built-in toy on 8 toy samples: baseline, fastv and random at one budget."""
    folder = tmp_path_factory.mktemp("run")
    config = {
        "name": "stats",
        "output": str(folder),
        "threads": 1,
        "dataset": {"limit": 8},
        "timing": FAST_TIMING,
        "grid": {"strategies": ["fastv", "random"], "layers": [2], "ratios": [0.75]},
    }
    (folder / "stats.yaml").write_text(yaml.safe_dump(config))
    assert main(["ablate", str(folder / "stats.yaml"), "--no-report"]) == 0
    return folder / "stats"


def test_every_row_records_its_samples_predictions(run):
    samples = load_samples("builtin:toy-vqa", "test", 8)
    for row in read_rows(run / "results.jsonl"):
        mine = SamplePredictions.of(row)
        assert mine.ids == [s.id for s in samples] and mine.answers == [s.answers for s in samples]
        assert mine.correct == exact_matches(row["predictions"], mine.answers)
        assert sum(mine.correct) / 8 == row["accuracy_exact"]
        assert all(x is not None and x <= 0 for x in mine.answer_logprobs)


def test_report_samples_lists_a_cells_mistakes(run, capsys):
    assert main(["report", str(run), "--samples", "fastv K=2 R=0.75"]) == 0
    out = capsys.readouterr().out
    row = find_row(read_rows(run / "results.jsonl"), "fastv K=2 R=0.75")
    wrong = [
        i for i, right in zip(row["per_sample"]["id"], row["per_sample"]["correct"], strict=True) if not right
    ]
    assert out.startswith(f"fastv K=2 R=0.75 (cell 1, key {row['key']}): {len(wrong)} of 8 answers wrong")
    assert [line.split()[0] for line in out.split("\n\n")[0].splitlines()[2:]] == wrong
    assert not (run / "summary.md").exists()  # a query: nothing written
    assert main(["report", str(run), "--samples", "nope"]) == 2
    assert "no measured cell 'nope'" in capsys.readouterr().err
