"""vLLM greedy generation in a process of its own: the plug-in reads its config once per process.

`python engine.py JOB OUT` runs the JSON job (model folder, groups of requests, tokens to generate) in one
`LLM`, each group in one `generate` call, and writes each request's generated token ids to OUT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

# one process for the front-end, engine core and worker: each extra process re-imports vLLM (~30 s here)
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
IMAGE_SIDE = 24  # the toy checkpoints' CLIP input side (6 x 6 patches of 4 pixels)
VIDEO_FRAMES = 4  # the toy videos' frames: two temporal patches of Qwen2-VL's `temporal_patch_size` 2
VIDEO_FPS = 1.0  # their frame rate: Qwen2.5-VL's M-RoPE time ids step by 2 / fps x `tokens_per_second`


@dataclass(frozen=True)
class Request:
    """One prompt: token ids with one placeholder per image and per video, and the seeds of its images
    and videos."""

    prompt: list[int]
    images: list[int]
    videos: tuple[int, ...] = ()


def image(seed: int) -> Image.Image:
    """A seeded random RGB image at the toy tower's input size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def video(seed: int) -> np.ndarray:
    """A seeded random RGB video [frames, side, side, 3] at the toy tower's input size."""
    shape = (VIDEO_FRAMES, IMAGE_SIDE, IMAGE_SIDE, 3)
    return np.random.default_rng(10_000 + seed).integers(0, 256, shape, dtype=np.uint8)


def video_metadata(frames: int) -> dict[str, Any]:
    """The metadata vLLM takes beside a video (Qwen2.5-VL requires it): all its `frames` at `VIDEO_FPS`."""
    return {
        "fps": VIDEO_FPS,
        "duration": frames / VIDEO_FPS,
        "total_num_frames": frames,
        "frames_indices": list(range(frames)),
        "video_backend": "opencv",
    }


def run_engine(
    model: Path, groups: list[list[Request]], max_tokens: int, config: Path | None, folder: Path
) -> subprocess.CompletedProcess:
    """Run the job in a fresh Python process with `TOKENPRUNE_VLLM_CONFIG` = `config` (unset for None)."""
    job, out = folder / "job.json", folder / "out.json"
    payload = {
        "model": str(model),
        "max_tokens": max_tokens,
        "groups": [[asdict(r) for r in g] for g in groups],
    }
    job.write_text(json.dumps(payload))
    env = {key: value for key, value in os.environ.items() if key != "TOKENPRUNE_VLLM_CONFIG"}
    env.update(ENGINE_ENV)
    if config is not None:
        env["TOKENPRUNE_VLLM_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, __file__, str(job), str(out)], env=env, capture_output=True, text=True, timeout=600
    )


def generated(model: Path, groups: list[list[Request]], max_tokens: int, config: Path | None, folder: Path):
    """Generated token ids per group and request; the engine's output on failure."""
    done = run_engine(model, groups, max_tokens, config, folder)
    if done.returncode != 0:
        raise AssertionError(f"vLLM failed:\n{done.stderr[-6000:]}")
    return json.loads((folder / "out.json").read_text())


def one_stage(strategy: str, stage: dict[str, Any], budget: dict[str, Any]) -> dict[str, Any]:
    """A one-stage config: `stage` (its layer or site) with `budget`'s keep or ratio and params, the
    shortened prompt numbered `renumbered` (as vLLM numbers it)."""
    return {
        "strategy": strategy,
        "stages": [{**stage, **{k: v for k, v in budget.items() if k in ("keep", "ratio")}}],
        "positions": "renumbered",
        "params": budget.get("params", {}),
    }


def written(folder: Path, config: dict[str, Any]) -> Path:
    """`config` saved as the YAML file `TOKENPRUNE_VLLM_CONFIG` names."""
    path = folder / "reduction.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_vllm_equals_hf(
    model: Path,
    groups: list[list[Request]],
    max_tokens: int,
    config: dict[str, Any] | None,
    folder: Path,
    hf_greedy: Callable[[Request], list[int]],
) -> None:
    """vLLM's tokens under `config` (None: unreduced) == `hf_greedy`'s, request by request, group by group."""
    path = None if config is None else written(folder, config)
    got = generated(model, groups, max_tokens, path, folder)
    assert got == [[hf_greedy(request) for request in group] for group in groups]


def main(job_path: str, out_path: str) -> None:
    """Generate greedily for every group of the job and write the token ids."""
    from transformers import GenerationConfig
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    llm = LLM(
        model=job["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
        distributed_executor_backend="uni",
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    suppressed = set(GenerationConfig.from_pretrained(job["model"]).suppress_tokens or ())
    text_tokens = [token for token in range(vocab) if token not in suppressed]  # never a placeholder, as HF
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], allowed_token_ids=text_tokens)
    results = []
    for group in job["groups"]:
        prompts = [{"prompt_token_ids": r["prompt"], "multi_modal_data": media(r)} for r in group]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results.append([list(output.outputs[0].token_ids) for output in outputs])
    Path(out_path).write_text(json.dumps(results))


def media(request: dict[str, Any]) -> dict[str, list]:
    """A request's `multi_modal_data`: its images, and its videos (with their metadata) when it has any."""
    data: dict[str, list] = {"image": [image(s) for s in request["images"]]}
    if request["videos"]:
        data["video"] = [(video(s), video_metadata(VIDEO_FRAMES)) for s in request["videos"]]
    return data


if __name__ == "__main__":
    main(*sys.argv[1:3])
