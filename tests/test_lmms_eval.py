"""The lmms-eval integration: the `tokenprune` model, the `tokenprune_toy_vqa` task, the `lmms-eval` source.

These tests need the lmms-eval extra and skip cleanly without it; CI installs it
(`pip install -e ".[test,lmms-eval]"`, .ci/run), so they run there. Everything is offline, on the
built-in toy LLaVA: lmms-eval's own evaluator scores it (in-process, and once through its command
line under a two-process data-parallel launch), and the lab's evaluation is the oracle.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before lmms-eval imports datasets, which reads them once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lmms_eval")

import torch
import yaml
from lmms_eval.api.instance import Instance
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager
from PIL import Image
from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor, VideoLlavaVideoProcessor

import tokenprune as tp
from tokenprune.builtin.models import word_tokenizer
from tokenprune.errors import ConfigError, InputError
from tokenprune.integrations.lmms_eval import TASKS_DIR, manifest
from tokenprune.integrations.lmms_eval.__main__ import main as include_path_main
from tokenprune.integrations.lmms_eval.args import ModelArgs
from tokenprune.integrations.lmms_eval.model import TokenPruneLMM, cut_at, generation_settings
from tokenprune.integrations.lmms_eval.toy_task import DATA_FILE, TASK, doc_to_visual, records
from tokenprune.lab.batches import make_batches
from tokenprune.lab.cli import main as cli_main
from tokenprune.lab.config import AblationConfig
from tokenprune.lab.datasets import load_samples
from tokenprune.lab.grid import expand_grid
from tokenprune.lab.lmms_bench import LmmsBench
from tokenprune.lab.loading import Loaded, load_model
from tokenprune.lab.metrics import Outputs, accuracy, evaluate
from tokenprune.lab.report import SAMPLE_IMAGE
from tokenprune.lab.results import read_rows
from tokenprune.testing.models import ToySize, toy_video_llava
from tokenprune.testing.oracles import oracle_logits

FASTV_8 = tp.ReductionConfig(strategy="fastv", layer=2, keep=8)  # 8 of 144: about half the answers survive


@pytest.fixture(scope="module")
def toy() -> Loaded:
    return load_model("builtin:toy-llava")


@pytest.fixture(scope="module")
def tasks() -> TaskManager:
    return TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False)


def lab_outputs(toy: Loaded, limit: int, reduction: tp.ReductionConfig | None) -> tuple[Outputs, list]:
    """The lab's evaluation (`tokenprune ablate`'s) of the first `limit` toy test samples, and the samples."""
    samples = load_samples("builtin:toy-vqa", "test", limit)
    return evaluate(toy, make_batches(toy, samples, 8), reduction), samples


def run_toy_task(model: object, tasks: TaskManager, limit: int, **model_args: str) -> dict:
    """lmms-eval's evaluator on `tokenprune_toy_vqa` (per-sample records kept)."""
    return simple_evaluate(
        model=model,
        model_args=",".join(f"{k}={v}" for k, v in model_args.items()) or None,
        tasks=[TASK],
        limit=limit,
        task_manager=tasks,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )


def answers_by_doc(results: dict) -> list[str]:
    """The model's answers in document order."""
    records_ = sorted(results["samples"][TASK], key=lambda record: record["doc_id"])
    return [record["resps"][0][0] for record in records_]


def test_lmms_eval_finds_the_model_by_name():
    assert get_model("tokenprune") is TokenPruneLMM
    assert manifest().model_id == "tokenprune"


def test_the_include_path_command_prints_the_task_folder(capsys):
    include_path_main(["--include-path"])
    folder = Path(capsys.readouterr().out.strip())
    assert folder == TASKS_DIR
    assert (folder / TASK / f"{TASK}.yaml").is_file()


def test_the_task_file_holds_the_builtin_test_split():
    """Regenerate with `toy_task.write_records()` when the toy task's generator changes."""
    lines = DATA_FILE.read_text().splitlines()
    assert [json.loads(line) for line in lines] == records()
    first = load_samples("builtin:toy-vqa", "test", 3)
    for record, sample in zip(records(3), first, strict=True):
        assert doc_to_visual(record)[0].tobytes() == sample.images[0].tobytes()


def test_unreduced_toy_llava_scores_100_percent_through_lmms_eval(toy, tasks, tmp_path):
    sidecar = tmp_path / "costs.json"
    results = run_toy_task(
        "tokenprune", tasks, 32, pretrained="builtin:toy-llava", batch_size="8", efficiency_path=str(sidecar)
    )
    assert results["results"][TASK]["accuracy_exact,none"] == 1.0
    costs = json.loads(sidecar.read_text())
    assert costs["format"] == "tokenprune-lmms-eval-efficiency/1" and costs["reduction"] is None
    task = costs["tasks"][TASK]
    reference, _ = lab_outputs(toy, 32, None)
    assert (task["samples"], task["batches"]) == (32, 4)
    assert task["visual_tokens_kept"] == task["visual_tokens_before"] == 144
    assert task["prefill_flops"] == statistics.mean(reference.flops)
    assert task["prefill_s_per_batch"] > 0 and task["overhead_s_per_batch"] is None


def test_a_reduced_config_scores_what_the_lab_scores(toy, tasks):
    lmm = TokenPruneLMM.from_loaded(toy, "builtin:toy-llava", FASTV_8, batch_size=8)
    results = run_toy_task(lmm, tasks, 16)
    outputs, samples = lab_outputs(toy, 16, FASTV_8)
    lab = accuracy(outputs.predictions, [s.answers for s in samples])
    score = results["results"][TASK]["accuracy_exact,none"]
    assert 0.0 < score < 1.0  # a reduction that changes answers, so that agreeing means something
    assert score == lab["accuracy_exact"]
    assert results["results"][TASK]["accuracy_contains,none"] == lab["accuracy_contains"]
    assert answers_by_doc(results) == outputs.predictions  # lmms-eval batches longest first: other batches
    task = lmm.efficiency()["tasks"][TASK]
    assert task["visual_tokens_kept"] == statistics.mean(outputs.visual_after) == 8
    assert task["prefill_flops"] == statistics.mean(outputs.flops)
    assert task["overhead_s_per_batch"] > 0


def test_batch_8_answers_equal_batch_1_answers(toy, tasks):
    answers = []
    for batch_size in (1, 8):
        lmm = TokenPruneLMM.from_loaded(toy, "builtin:toy-llava", FASTV_8, batch_size=batch_size)
        answers.append(answers_by_doc(run_toy_task(lmm, tasks, 16)))
        assert lmm.efficiency()["tasks"][TASK]["batches"] == 16 // batch_size
    assert answers[0] == answers[1]


def loglikelihood_requests(lmm: TokenPruneLMM, docs: list[dict], continuations: list[str]) -> list[Instance]:
    """One loglikelihood request per (document, continuation), as lmms-eval builds multiple-choice ones."""
    lmm.task_dict = {"toy": {"test": docs}}
    return [
        Instance(
            request_type="loglikelihood",
            arguments=(doc["question"], continuation, doc_to_visual, doc_id, "toy", "test"),
            idx=index,
            metadata={"task": "toy", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
        for index, continuation in enumerate(continuations)
    ]


@pytest.mark.parametrize("reduction", [None, FASTV_8], ids=["unreduced", "fastv"])
def test_loglikelihood_of_one_token_is_the_labs_first_token_logprob(toy, reduction):
    lmm = TokenPruneLMM.from_loaded(toy, "builtin:toy-llava", reduction, batch_size=1)
    docs, choices = records(2), ["red", "square", "two"]
    scores = lmm.loglikelihood(loglikelihood_requests(lmm, docs, [f" {c}" for c in choices]))
    outputs, _ = lab_outputs(toy, 2, reduction)
    ids = toy.processor.tokenizer.convert_tokens_to_ids(choices)
    for doc_id in range(len(docs)):
        for choice, token in enumerate(ids):
            logprob, greedy = scores[doc_id * len(choices) + choice]
            assert logprob == pytest.approx(outputs.logprobs[doc_id, token].item(), abs=1e-5)
            assert greedy == (outputs.first_tokens[doc_id] == token)
    assert lmm.efficiency()["tasks"]["toy"]["samples"] == len(docs) * len(choices)


def test_loglikelihood_of_several_tokens_runs_on_the_cache(toy):
    """Unreduced, a continuation scored on the prompt's cache equals one forward over both."""
    lmm = TokenPruneLMM.from_loaded(toy, "builtin:toy-llava", None, batch_size=1)
    doc = records(1)[0]
    ((logprob, _),) = lmm.loglikelihood(loglikelihood_requests(lmm, [doc], [" red square"]))
    image = doc_to_visual(doc)
    prompt = toy.prompt.format(question=doc["question"])
    inputs = toy.processor(images=image, text=prompt + " red square", return_tensors="pt")
    with torch.no_grad():
        logits = toy.model(**inputs).logits[0, -3:-1].float()
    target = inputs["input_ids"][0, -2:]
    expected = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum().item()
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_of_several_tokens_on_a_reduced_cache_is_the_mask_oracles(toy):
    """With FastV, a continuation scored on the prompt's reduced cache equals the unreduced model over
    prompt and continuation with the tokens FastV removed from the prompt hidden as keys from layer K
    on (the mask oracle; the continuation is never removed). float32, tolerance 1e-4."""
    lmm = TokenPruneLMM.from_loaded(toy, "builtin:toy-llava", FASTV_8, batch_size=1)
    doc = records(1)[0]
    ((logprob, _),) = lmm.loglikelihood(loglikelihood_requests(lmm, [doc], [" red square"]))
    image = doc_to_visual(doc)
    prompt = toy.prompt.format(question=doc["question"])
    prompt_inputs = toy.processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad(), tp.attach(toy.model, FASTV_8) as handle:
        toy.model(**prompt_inputs)
        trace = handle.trace
    inputs = toy.processor(images=image, text=prompt + " red square", return_tensors="pt")
    with torch.no_grad():
        logits = oracle_logits(toy.model, inputs, trace, appended=2)[0, -3:-1].float()
    target = inputs["input_ids"][0, -2:]
    expected = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum().item()
    unreduced = TokenPruneLMM.from_loaded(toy, "builtin:toy-llava", None, batch_size=1)
    ((plain, _),) = unreduced.loglikelihood(loglikelihood_requests(unreduced, [doc], [" red square"]))
    assert logprob == pytest.approx(expected, abs=1e-4) and abs(logprob - plain) > 1e-3


def test_loglikelihood_errors_name_the_task(toy):
    lmm = TokenPruneLMM.from_loaded(toy, "builtin:toy-llava", None, batch_size=1)
    with pytest.raises(InputError, match=r"task 'toy'.*no tokens"):
        lmm.loglikelihood(loglikelihood_requests(lmm, records(1), [""]))


def test_model_args_build_the_reduction(tmp_path):
    args = ModelArgs.parse({"strategy": "random", "layer": 2, "keep": 8, "params.seed": 3, "device": None})
    assert args.reduction_config() == tp.ReductionConfig(
        strategy="random", layer=2, keep=8, params={"seed": 3}
    )
    assert ModelArgs.parse({"pretrained": "builtin:toy-llava"}).reduction_config() is None
    path = tmp_path / "fastv.yaml"
    path.write_text("strategy: fastv\nlayer: 2\nkeep: 8\n")
    assert ModelArgs.parse({"reduction": str(path)}).reduction_config() == FASTV_8


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"stratgy": "fastv"}, "stratgy"),
        ({"batch_size": "auto"}, "batch_size"),
        ({"layer": 2, "keep": 8}, "layer, keep given without a strategy"),
        ({"strategy": "fastv", "ratio": 1.5}, "ratio"),
        ({"strategy": "fastv", "reduction": "r.yaml"}, "not both"),
    ],
)
def test_bad_model_args_are_config_errors_naming_them(values, message):
    with pytest.raises(ConfigError, match=message):
        ModelArgs.parse(values).reduction_config()


def test_generation_kwargs_are_greedy_and_until_cuts():
    settings, until = generation_settings({"max_new_tokens": 2, "temperature": 0, "until": "\n\n"})
    assert settings == {"max_new_tokens": 2, "num_beams": 1, "do_sample": False}
    assert until == ["\n\n"]
    assert cut_at("red\n\nASSISTANT: blue", ["ASSISTANT:", "\n\n"]) == "red"


def test_lmms_bench_runs_cells_through_lmms_eval(tmp_path):
    config = AblationConfig.model_validate(
        {
            "name": "lmms",
            "dataset": {"source": "lmms-eval", "tasks": [TASK], "limit": 8},
            "batch_size": 8,
            "grid": {"strategies": ["fastv"], "layers": [2], "keeps": [8]},
            "timing": {"repeats": 1, "warmup": 0},
        }
    )
    baseline, fastv = expand_grid(config, "lmms-eval")
    bench = LmmsBench.open(config, Path("lmms.yaml"), "run-fingerprint")
    rows = [bench.measure(baseline), bench.measure(fastv)]
    assert {row["fingerprint"] for row in rows} == {"run-fingerprint"}
    assert rows[0]["lmms_eval"][TASK]["accuracy_exact"] == 1.0
    assert [row["accuracy_exact"] for row in rows] == [
        row["lmms_eval"][TASK]["accuracy_exact"] for row in rows
    ]
    assert [row["visual_tokens_after"] for row in rows] == [144, 8]
    assert rows[0]["flops_ratio"] == 1.0 > rows[1]["flops_ratio"]
    assert rows[1]["prefill_speedup"] is not None and rows[1]["overhead_s"] > 0
    assert rows[1]["lmms_eval_costs"][TASK]["samples"] == 8
    assert bench.failure(fastv, ValueError("no"))["error"] == "ValueError: no"
    bench.save_sample_image(tmp_path)
    assert (tmp_path / SAMPLE_IMAGE).is_file()


def test_an_ablation_over_lmms_eval_tasks_runs_in_shards_resumes_and_reports(tmp_path, capsys):
    """`tokenprune ablate` with `source: lmms-eval`: two shards write their rows, a whole run then finds
    every cell finished, and the report merges them."""
    config = {
        "name": "lmms",
        "output": str(tmp_path),
        "dataset": {"source": "lmms-eval", "tasks": [TASK], "limit": 8},
        "batch_size": 8,
        "grid": {"strategies": ["fastv", "random"], "layers": [2], "keeps": [8]},
        "timing": {"repeats": 1, "warmup": 0},
    }
    path = tmp_path / "lmms.yaml"
    path.write_text(yaml.safe_dump(config))
    for shard in ("0/2", "1/2"):
        assert cli_main(["ablate", str(path), "--shard", shard, "--no-report"]) == 0
    shards = [read_rows(tmp_path / "lmms" / f"results.shard-{i}-of-2.jsonl") for i in (0, 1)]
    assert [[row["label"] for row in rows] for rows in shards] == [
        ["baseline", "random K=2 keep=8 seed=0"],
        ["fastv K=2 keep=8"],
    ]
    rows = sorted((row for rows in shards for row in rows), key=lambda row: row["index"])
    assert rows[0]["accuracy_exact"] == 1.0 and all(row["visual_tokens_after"] == 8 for row in rows[1:])
    assert cli_main(["ablate", str(path)]) == 0
    assert "3 already finished" in capsys.readouterr().err
    summary = (tmp_path / "lmms" / "summary.md").read_text()
    assert "fastv K=2 keep=8" in summary and (tmp_path / "lmms" / "accuracy-vs-flops.png").is_file()


VIDEO_TEMPLATE = (
    "{% for m in messages %}user: {% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<video> {% elif c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} assistant:{% endfor %}"
)


def toy_video_llava_loaded() -> Loaded:
    """A seeded toy Video-LLaVA with a processor: word tokenizer, 24-pixel frames, a chat template."""
    size = ToySize()
    specials = ["<pad>", "<s>", "</s>", "<image>", "<video>", "<unk>"]  # image 3, video 4 as the toy model
    words = [*specials, "what", "is", "this", "user", "assistant", ":"]
    side = {"shortest_edge": size.grid * size.patch}
    crop = {"height": size.grid * size.patch, "width": size.grid * size.patch}
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(size=side, crop_size=crop),
        video_processor=VideoLlavaVideoProcessor(size=side, crop_size=crop),
        tokenizer=word_tokenizer(words, ["<image>", "<video>"]),
        patch_size=size.patch,
        chat_template=VIDEO_TEMPLATE,
    )
    model = toy_video_llava(size)
    return Loaded(model, processor, "{question}", 3, tp.adapter_for(model))


def test_videos_as_frame_lists_reach_the_video_tower_batch_invariantly():
    loaded = toy_video_llava_loaded()
    docs = [{"question": "what is this", "shade": shade} for shade in (0, 90, 180)]

    def frames(doc: dict) -> list:
        return [[Image.new("RGB", (32, 32), (doc["shade"], 40 * t, 0)) for t in range(4)]]

    answers = []
    for batch_size in (1, 3):
        lmm = TokenPruneLMM.from_loaded(loaded, "toy-video-llava", FASTV_8, batch_size=batch_size)
        lmm.task_dict = {"video": {"test": docs}}
        requests = [
            Instance(
                request_type="generate_until",
                arguments=(doc["question"], {"max_new_tokens": 3}, frames, doc_id, "video", "test"),
                idx=0,
                metadata={"task": "video", "doc_id": doc_id, "repeats": 1},
            )
            for doc_id, doc in enumerate(docs)
        ]
        answers.append(lmm.generate_until(requests))
        costs = lmm.efficiency()["tasks"]["video"]
        assert (costs["visual_tokens_before"], costs["visual_tokens_kept"]) == (4 * (1 + 36), 8)
    assert answers[0] == answers[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_command_line_data_parallel_run_matches_the_lab(toy, tmp_path):
    """`torchrun --nproc_per_node 2 -m lmms_eval` on the CPU: two ranks, each a sidecar beside the results.

    (`accelerate launch --cpu --num_processes 2` starts one process on a CPU-only machine; see docs.)
    """
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"),
        *(str(free_port()), "-m", "lmms_eval", "--model", "tokenprune"),
        *("--model_args", "pretrained=builtin:toy-llava,strategy=fastv,layer=2,keep=8"),
        *("--tasks", TASK, "--include_path", str(TASKS_DIR), "--limit", "16", "--batch_size", "8"),
        *("--output_path", str(tmp_path)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = tmp_path.glob("*/*_results.json")
    score = json.loads(results_file.read_text())["results"][TASK]["accuracy_exact,none"]
    outputs, samples = lab_outputs(toy, 16, FASTV_8)
    assert score == accuracy(outputs.predictions, [s.answers for s in samples])["accuracy_exact"]
    sidecars = list(results_file.parent.glob("*_tokenprune_efficiency_rank*.json"))
    assert sorted(json.loads(p.read_text())["rank"] for p in sidecars) == [0, 1]  # names begin with a time
    assert sum(json.loads(p.read_text())["tasks"][TASK]["samples"] for p in sidecars) == 16
