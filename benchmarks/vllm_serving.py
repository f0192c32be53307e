"""vLLM offline serving with and without a tokenprune reduction: throughput and time to first token.

Run in the vLLM virtualenv (integrations/vllm/setup-venv.sh):

    .venv-vllm/bin/python benchmarks/vllm_serving.py --out serving.md             # CPU: LLaVA-shaped "small"
    .venv-vllm/bin/python benchmarks/vllm_serving.py --size llava-7b --out s.md   # a GPU: LLaVA-1.5-7B shapes

A LLaVA with random weights at the chosen size (576 visual tokens per 336px image, as LLaVA-1.5) is saved
once; two engines hold it, one plain and one with the tokenprune-vllm plug-in configured (each in a
process of its own: vLLM loads plug-ins once per process). This process sends both the same requests,
alternating which goes first, and keeps the median of `--repeats` paired runs per batch size (prefix
and processor caches off, so each repeat computes every request afresh):

- throughput: generated tokens per second of one `generate` call over the batch (`--tokens` each,
  end of sequence ignored);
- time to first token: the wall time of a `generate` call over the batch with one token to generate
  (prefill of every request, the image encoder included).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import yaml

from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize

REQUIRES = ("vllm",)  # runs where vLLM is installed: integrations/vllm/ci.sh smoke-runs it there

SIZES = {  # hidden, layers, heads, MLP, grid (patches per side), patch, vocab, vision width and depth
    "toy": ToySize(hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=256, vision_hidden=64),
    "small": ToySize(512, 8, 8, 8, 1408, 24, 14, 2048, 256, 4),
    "llava-7b": ToySize(4096, 32, 32, 32, 11008, 24, 14, 32064, 1024, 24),
}
PROMPT_TEXT = [11, 12, 13, 14, 15, 16, 17, 18]


@dataclass(frozen=True)
class Measure:
    """What one engine is asked: `batch` requests, `tokens` to generate each."""

    batch: int
    tokens: int


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per request (throughput)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategy", default="divprune")
    parser.add_argument("--keep", type=int, default=64, help="visual tokens kept per image (of 576)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    parser.add_argument("--smoke", action="store_true", help="toy size, batches 1 and 2, one repeat")
    args = parser.parse_args()
    if args.smoke:  # every step runs (both engines, paired rounds, the table), nothing worth timing
        args.size, args.batches, args.tokens, args.repeats, args.keep = "toy", [1, 2], 4, 1, 9
    return args


def engine(conn: Connection, model: str, config: str | None, dtype: str) -> None:
    """Child process: one `LLM` (the plug-in active when `config` names a reduction) serving `Measure`s."""
    os.environ.pop("TOKENPRUNE_VLLM_CONFIG", None)
    if config is not None:
        os.environ["TOKENPRUNE_VLLM_CONFIG"] = config
    from vllm import LLM, SamplingParams

    # no prefix or processor cache: every repeat sends the same requests, each must be computed afresh
    llm = LLM(
        model=model, dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0,
        enable_prefix_caching=False, mm_processor_cache_gb=0,
    )  # fmt: skip
    side = llm.llm_engine.model_config.hf_config.vision_config.image_size
    conn.send("ready")
    while (measure := conn.recv()) is not None:
        prompts = [request(i, side) for i in range(measure.batch)]
        params = SamplingParams(temperature=0.0, max_tokens=measure.tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        conn.send((seconds, sum(len(o.outputs[0].token_ids) for o in outputs)))


def request(seed: int, side: int) -> dict:
    """A prompt with one seeded random image (a different image per request)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    prompt = [1, *PROMPT_TEXT[:3], IMAGE_TOKEN_ID, *PROMPT_TEXT[3:]]
    return {"prompt_token_ids": prompt, "multi_modal_data": {"image": Image.fromarray(pixels)}}


def start(model: Path, config: Path | None, dtype: str) -> tuple[mp.Process, Connection]:
    """An engine process, once it is ready."""
    parent, child = mp.get_context("spawn").Pipe()
    process = mp.get_context("spawn").Process(
        target=engine, args=(child, str(model), None if config is None else str(config), dtype)
    )
    process.start()
    child.close()  # the child holds its end: a failed start then ends `recv` with EOFError
    try:
        ready = parent.recv()
    except EOFError:
        ready = None
    if ready != "ready":
        process.join(timeout=30)
        raise RuntimeError(f"the engine{'' if config is None else ' with ' + str(config)} did not start")
    return process, parent


def stop(process: mp.Process, conn: Connection) -> None:
    """End an engine process: asked first, then terminated (its engine core follows its parent out)."""
    if process.is_alive():
        conn.send(None)
        process.join(timeout=30)
    if process.is_alive():
        process.terminate()
        process.join(timeout=30)


def paired(engines: dict[str, Connection], measure: Measure, repeats: int) -> dict[str, tuple[float, int]]:
    """Median (seconds, tokens) per engine over `repeats` rounds, the order alternating each round."""
    names = list(engines)
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in names}
    for round_ in range(repeats + 1):  # round 0 warms both up and is dropped
        for name in names if round_ % 2 == 0 else names[::-1]:
            engines[name].send(measure)
            result = engines[name].recv()
            if round_:
                runs[name].append(result)
    return {name: (statistics.median(s for s, _ in r), r[0][1]) for name, r in runs.items()}


def table(args: argparse.Namespace, engines: dict[str, Connection]) -> list[str]:
    """The markdown rows: per batch size, throughput and time to first token of both engines."""
    rows = [
        "| batch | tok/s unreduced | tok/s reduced | speed-up | TTFT unreduced (s) | TTFT reduced (s) "
        "| speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for batch in args.batches:
        decode = paired(engines, Measure(batch, args.tokens), args.repeats)
        first = paired(engines, Measure(batch, 1), args.repeats)
        plain, pruned = (decode[name][1] / decode[name][0] for name in ("unreduced", "reduced"))
        late, early = (first[name][0] for name in ("unreduced", "reduced"))
        rows.append(
            f"| {batch} | {plain:.1f} | {pruned:.1f} | {pruned / plain:.2f}x "
            f"| {late:.3f} | {early:.3f} | {late / early:.2f}x |"
        )
    return rows


def machine() -> str:
    """One line on where the numbers come from."""
    import torch
    import vllm

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    versions = f"vLLM {vllm.__version__}, torch {torch.__version__}"
    return f"{device}; {platform.processor() or platform.machine()}; {versions}"


def main() -> int:
    """Save the model, start both engines, measure, print (and write) the table."""
    args = parse_args()
    from tokenprune_vllm.checkpoints import save_tiny_llava

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine on the CPU
    with tempfile.TemporaryDirectory() as folder:
        model, config = Path(folder) / "llava", Path(folder) / "reduction.yaml"
        save_tiny_llava(model, SIZES[args.size])
        reduction = {"strategy": args.strategy, "layer": 0, "keep": args.keep, "positions": "renumbered"}
        config.write_text(yaml.safe_dump(reduction))
        processes: dict[str, tuple[mp.Process, Connection]] = {}
        try:
            processes["unreduced"] = start(model, None, args.dtype)
            processes["reduced"] = start(model, config, args.dtype)
            rows = table(args, {name: conn for name, (_, conn) in processes.items()})
        finally:
            for process, conn in processes.values():
                stop(process, conn)
    header = [
        f"vLLM offline serving, LLaVA-shaped `{args.size}` (random weights, {SIZES[args.size].grid ** 2} "
        "visual tokens per image), "
        f"{args.dtype}, {args.strategy} keeping {args.keep} per image, {args.tokens} tokens generated, "
        f"median of {args.repeats} paired runs. Machine: {machine()}.",
        "",
    ]
    text = "\n".join([*header, *rows]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
