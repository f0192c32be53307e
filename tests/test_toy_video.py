"""The built-in toy video task (`builtin:toy-video-vqa`) and the trained toy Video-LLaVA shipped with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoProcessor, VideoLlavaForConditionalGeneration

import tokenprune as tp
from tokenprune.builtin.models import (
    TOY_VIDEO_LLAVA_DIR,
    BuiltinModel,
    answer_questions,
    builtin_dataset,
    encode,
    load_toy_video_llava,
    vqa_accuracy,
)
from tokenprune.builtin.toyvideo import (
    COLOURS,
    DIRECTIONS,
    FRAME_SIZE,
    FRAMES,
    GRID,
    PATCH_SIZE,
    SHAPES,
    Track,
    all_questions,
    generate_samples,
)
from tokenprune.lab.batches import make_batches
from tokenprune.lab.config import load_ablation_config
from tokenprune.lab.datasets import contents_digest, load_samples
from tokenprune.lab.grid import expand_grid
from tokenprune.lab.loading import load_model
from tokenprune.lab.results import read_rows
from tokenprune.lab.runner import run_ablation
from tokenprune.testing.suite import language, strategy_sites, vision

ROOT = Path(__file__).parents[1]
HELDOUT_SLICE = 64
ACCURACY_FLOOR = 0.7  # docs/toy-video-model.md: 77 % held out, the blind guesser 38 %
FRAME_TOKENS = 1 + GRID * GRID  # the class token, then the patch grid


@pytest.fixture(scope="module")
def toy() -> BuiltinModel:
    return load_toy_video_llava()


def _fingerprint(samples) -> list:
    return [(s.id, s.question, s.answers, [f.tobytes() for f in s.frames]) for s in samples]


def test_generator_is_deterministic_and_seeded():
    first = generate_samples("test", 16, seed=3)
    assert _fingerprint(first) == _fingerprint(generate_samples("test", 16, seed=3))
    assert _fingerprint(generate_samples("test", 8, seed=3)) == _fingerprint(first[:8])
    assert _fingerprint(first) != _fingerprint(generate_samples("test", 16, seed=4))


def test_splits_share_no_clip():
    def clips(split):
        return {b"".join(f.tobytes() for f in s.frames) for s in generate_samples(split, 300)}

    assert not clips("train") & clips("test")


def test_unknown_split_and_kind_are_refused():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        generate_samples("val", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="question kind"):
        all_questions(generate_samples("test", 1)[0].tracks, "count")


def test_clips_are_eight_small_rgb_frames_with_one_word_answers():
    samples = builtin_dataset("builtin:toy-video-vqa", "train", 40)
    assert {len(s.frames) for s in samples} == {FRAMES}
    assert {(f.size, f.mode) for s in samples for f in s.frames} == {((FRAME_SIZE, FRAME_SIZE), "RGB")}
    assert {s.answers[0] for s in samples} <= {*COLOURS, *SHAPES, *DIRECTIONS}


def _pixel(sample, track: Track, frame: int) -> tuple[int, int, int]:
    """The colour at the centre of the patch `track` covers in `frame`."""
    centre = PATCH_SIZE // 2 - 1
    return sample.frames[frame].getpixel(
        (track.columns[frame] * PATCH_SIZE + centre, track.row * PATCH_SIZE + centre)
    )


def test_answers_depend_on_when_things_happen():
    """Objects are absent before they appear, colours change mid-clip, movers change column; every
    question's answer is read off the frames where its event happens."""
    for sample in generate_samples("test", 60):
        first, last = sorted(sample.tracks, key=lambda track: track.appears)
        assert first.appears < last.appears and last.appears > 0
        assert _pixel(sample, last, 0) == (128, 128, 128)  # not on screen yet
        for track in sample.tracks:
            if track.shape in ("square", "circle"):  # shapes covering their patch's centre
                assert _pixel(sample, track, FRAMES - 1) == COLOURS[track.new_colour]
                assert _pixel(sample, track, track.appears) == COLOURS[track.colour]
        changes = [track for track in sample.tracks if track.colour != track.new_colour]
        moves = [track for track in sample.tracks if track.direction() != "still"]
        assert len(changes) == len(moves) == 1
        assert (sample.question, sample.answers[0]) in {
            pair for kind in ("appears", "colour", "direction") for pair in all_questions(sample.tracks, kind)
        }


def test_the_lab_reads_the_task_as_videos():
    samples = load_samples("builtin:toy-video-vqa", "test", 3)
    assert [(len(s.images), len(s.videos), len(s.videos[0])) for s in samples] == [(0, 1, FRAMES)] * 3
    again = load_samples("builtin:toy-video-vqa", "test", 3)
    assert contents_digest(samples) == contents_digest(again)
    other = load_samples("builtin:toy-video-vqa", "test", 3, seed=1)
    assert contents_digest(samples) != contents_digest(other)


def test_model_loads_offline_through_from_pretrained(toy):
    assert isinstance(toy.model, VideoLlavaForConditionalGeneration)
    assert (toy.prompt, toy.max_new_tokens) == ("<video> {question}", 2)
    assert sum(f.stat().st_size for f in TOY_VIDEO_LLAVA_DIR.iterdir()) < 10 * 2**20
    processor = AutoProcessor.from_pretrained(TOY_VIDEO_LLAVA_DIR)
    inputs = encode(BuiltinModel(toy.model, processor, toy.prompt, 2), generate_samples("test", 2))
    video_tokens = (inputs["input_ids"] == toy.model.config.video_token_id).sum(1)
    assert video_tokens.tolist() == [FRAMES * FRAME_TOKENS] * 2
    assert inputs["pixel_values_videos"].shape == (2, FRAMES, 3, FRAME_SIZE, FRAME_SIZE)


def test_the_builtin_name_loads_the_shipped_model_with_its_adapter(toy):
    loaded = load_model("builtin:toy-video-llava")
    assert loaded.adapter.name == "video_llava"
    assert (loaded.prompt, loaded.max_new_tokens) == (toy.prompt, toy.max_new_tokens)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.model.state_dict().values(), toy.model.state_dict().values(), strict=True)
    )
    batch = make_batches(loaded, load_samples("builtin:toy-video-vqa", "test", 2), 2)[0]
    assert (
        batch.inputs["input_ids"] == loaded.model.config.video_token_id
    ).sum() == 2 * FRAMES * FRAME_TOKENS


@torch.no_grad()
@pytest.mark.parametrize(("strategy", "site"), strategy_sites())
def test_every_strategy_attaches_or_is_refused(toy, strategy, site):
    """Every installed strategy, at every site it acts at, reads the toy's clips or refuses saying why."""
    config = language(strategy) if site == "language" else vision(strategy)
    inputs = encode(toy, generate_samples("test", 2))
    try:
        with tp.attach(toy.model, config, adapter="video_llava") as handle:
            logits, trace = toy.model(**inputs).logits, handle.trace
    except tp.TokenPruneError as refusal:
        assert len(str(refusal)) > 20, f"a refusal must say why: {refusal!r}"
        return
    assert torch.isfinite(logits[:, -1]).all() and trace


def test_heldout_accuracy_is_as_documented(toy):
    samples = generate_samples("test", HELDOUT_SLICE, seed=0)
    accuracy = vqa_accuracy(answer_questions(toy, samples), samples)
    settings = json.loads((TOY_VIDEO_LLAVA_DIR / "tokenprune.json").read_text())
    assert accuracy >= ACCURACY_FLOOR
    assert settings["heldout"]["accuracy"] >= ACCURACY_FLOOR > settings["heldout"]["blind_rate"] + 0.25


def test_ablate_runs_the_builtin_video_names(tmp_path):
    config = {
        "model": {"source": "builtin:toy-video-llava"},
        "dataset": {"source": "builtin:toy-video-vqa", "limit": 8},
        "output": str(tmp_path),
        "threads": 1,
        "timing": {"warmup": 0, "repeats": 1, "decode_tokens": 32, "batch_size": 4},
        "grid": {"strategies": ["fastv"], "layers": [2], "ratios": [0.5]},
    }
    (tmp_path / "video.yaml").write_text(yaml.safe_dump(config))
    run_ablation(tmp_path / "video.yaml")
    baseline, fastv = read_rows(tmp_path / "video" / "results.jsonl")
    assert baseline["samples"] == 8 and baseline["accuracy_exact"] >= 0.5
    assert baseline["visual_tokens_before"] == FRAMES * FRAME_TOKENS
    assert fastv["visual_tokens_after"] == FRAMES * FRAME_TOKENS // 2


@pytest.mark.parametrize(("strategy", "layer", "share"), [("prunevid", 1, 0.4), ("holitom", 3, 0.5)])
def test_the_video_grid_runs_prunevid_and_holitom_alone_and_as_published(strategy, layer, share):
    """configs/paper-grid-video.yaml: each at the grid's three budgets, its first stage alone and followed
    by its paper's in-LLM stage (the paper's share of the first stage's tokens, original positions),
    the two-stage cells labelled by both layers and budgets."""
    cells = expand_grid(load_ablation_config(ROOT / "configs" / "paper-grid-video.yaml"), "data")
    ours = [cell for cell in cells if cell.reduction is not None and cell.reduction.strategy == strategy]
    alone = {cell.reduction.stages[0].keep: cell.label for cell in ours if len(cell.reduction.stages) == 1}
    published = {cell.reduction.stages[0].keep: cell for cell in ours if len(cell.reduction.stages) == 2}
    assert sorted(alone) == sorted(published) == [24, 40, 72]
    for keep, cell in published.items():
        second = cell.reduction.stages[1]
        assert (second.site, second.layer, second.keep) == ("language", layer, round(share * keep))
        assert cell.reduction.position_policy(second) == "original"
        assert cell.label.startswith(f"{strategy} K=0,{layer} keep={keep},{second.keep} ")
        assert cell.label != alone[keep]
