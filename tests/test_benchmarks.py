"""Every benchmark runs at its `--smoke` size, so none can rot unnoticed (issue 11, defect 14).

Each script runs in its own process, as a user runs it. A smoke run times nothing worth reading,
but it executes every section: the ideal's logits checked against tokenprune's (batch 1 and a
left-padded batch), the hook breakdown, the KV-cache lengths, the reference-loading path.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokenprune.lab.timing import PairedRatio
from tokenprune.testing.models import toy_llava

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def required_modules(script: Path) -> tuple[str, ...]:
    """The modules a benchmark declares it needs beyond tokenprune's own (its module-level `REQUIRES`)."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REQUIRES" for t in node.targets):
            return ast.literal_eval(node.value)
    return ()


def runs_here(script: Path) -> bool:
    """Whether every module the benchmark requires is importable in this environment."""
    return all(importlib.util.find_spec(module) is not None for module in required_modules(script))


# vllm_serving.py declares REQUIRES = ("vllm",): integrations/vllm/ci.sh smoke-runs it in vLLM's virtualenv
ELSEWHERE = sorted(p.name for p in BENCHMARKS.glob("*.py") if not runs_here(p))
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py" and runs_here(p))
# a paired row: label, then ratio and IQR with three decimals, then two times in ms
PAIRED_ROW = re.compile(r"^\S.* / .*\s\d+\.\d{3}\s+\d+\.\d{3}\s+\d+\.\d\s+\d+\.\d", re.MULTILINE)
SMOKE_TIMEOUT_S = 240  # seconds on a loaded 2-core machine; a few each on a quiet one
# what each script's own checks print once they passed (new scripts: the paired rows only)
CHECKED = {
    "prefill.py": ["target <= 1.02", "tokenprune's hooks", "checked"],
    "decode.py": ["cache checked", "tokenprune's hooks:", "target <= 1.03"],
    "families.py": ["target <= 1.02", "FLOPs bound"],
    "vit_throughput.py": ["FLOPs ratio", "ToMe matching"],
    "gpu_check.py": ["| exactness | fastv", "| half precision |", "| device_map |", "target <= 1.02"],
    "selection.py": ["of its prefill; target <= 2%", "divprune", "dart", "uniform"],
}


def run_benchmark(script: str, *options: str) -> subprocess.CompletedProcess[str]:
    """`python benchmarks/<script> <options>` from the repository root, one thread, output captured."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--threads", "1", *options],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        cwd=BENCHMARKS.parent,
    )


def test_every_benchmark_is_listed():
    """The parametrised smoke test below sees the benchmarks there are (a new file joins by itself)."""
    assert {"prefill.py", "decode.py", "families.py", "vit_throughput.py"} <= set(SCRIPTS)


def test_benchmarks_needing_another_environment_are_smoke_run_by_its_ci():
    """A benchmark left out here for a module it requires is smoke-run by an integration's ci.sh."""
    ci_scripts = " ".join(path.read_text() for path in BENCHMARKS.parent.glob("integrations/*/ci.sh"))
    for script in ELSEWHERE:
        assert f"benchmarks/{script} --smoke" in ci_scripts, f"no ci.sh smoke-runs {script}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_prints_paired_ratios(script):
    done = run_benchmark(script, "--smoke")
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "variant / baseline" in done.stdout
    rows = PAIRED_ROW.findall(done.stdout)
    assert any("noise floor" in row for row in rows), done.stdout
    assert len(rows) >= 2, done.stdout
    for marker in CHECKED.get(script, []):
        assert marker in done.stdout, f"{script} --smoke printed no {marker!r}:\n{done.stdout}"


def test_selection_smoke_at_the_llava_shape_sets_selections_against_the_estimated_prefill():
    done = run_benchmark(
        "selection.py", "--smoke", "--shape", "llava-1.5", "--strategies", "divprune", "pool"
    )
    assert done.returncode == 0, (
        f"--shape llava-1.5 --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    assert "estimated prefill:" in done.stdout and "32 x one decoder layer" in done.stdout
    for name in ("divprune", "pool"):
        assert f"  {name:<12} selection" in done.stdout and "of the estimated prefill" in done.stdout


def test_prefill_smoke_covers_every_section():
    done = run_benchmark("prefill.py", "--smoke", "--dtype", "bfloat16", "--ratios", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "== batch 3, left-padded" in out
    assert out.count("target <= 1.02") == 2  # tokenprune / ideal, once per batch
    assert "tokenprune's hooks" in out and "Session" in out  # hook names come from the code itself
    assert "checked" in out  # the KV-cache lengths matched the trace


def test_video_smoke_times_prefill_decode_and_where_the_time_goes_at_32_frames():
    """The video benchmark at 32 frames (smoke widths): a pre-LLM video method, one that merges, and the
    pruned KV cache at each `--cache-layers` K each get paired prefill and decode rows and their breakdown."""
    methods = ("--methods", "evs", "fastvid", "cache", "--cache-layers", "0", "2")
    done = run_benchmark("video.py", "--smoke", "--frames", "32", *methods)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    out = done.stdout
    assert "== 32 frames" in out and "(160 visual)" in out
    for row in ("evs", "fastvid", "cache K=0", "cache K=2"):
        assert f"{row} prefill / unreduced" in out and f"{row} decode step / unreduced" in out
    assert out.count("    selection ") == 4 and out.count("KV cache ") == 4
    assert out.count("(between decode steps)") == 2  # the cache site selects while decoding
    breakdown = {k: out.split(f"cache K={k} decode step")[1].splitlines()[1] for k in (0, 2)}
    # at K = 0 the site prunes every layer's cache, as the layer-0 methods do; at K = 2 layers 0-1 keep all
    assert "KV cache 0.10 of 0.33 MiB" in breakdown[0] and "KV cache 0.21 of 0.33 MiB" in breakdown[2]


def test_gpu_check_smoke_writes_every_section_with_no_failure(tmp_path):
    table = tmp_path / "gpu-check.md"
    done = run_benchmark("gpu_check.py", "--smoke", "--out", str(table))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    text = table.read_text()
    assert "**FAIL**" not in text
    one_device = "time to first token (one device)"
    sections = ("exactness", "half precision", one_device, "device_map", "selection overhead")
    for section in sections:
        assert f"| {section} |" in text, text
    assert "skipped: no CUDA device" in text  # FlashAttention-2 needs one: said, not silently left out
    assert text.count("| pass |") >= 8  # every pruning strategy's oracles, bf16 against float32
    assert "| selection overhead | divprune: batch 3, keep 4 | divprune " in text
    assert text.count("of its prefill") >= 3  # divprune, dart, uniform and every other strategy's share


def test_gpu_check_counts_the_flash_attention_refusal_of_proportional_attention():
    """The FlashAttention-2 rows of a GPU run: ToMe's attach-time refusal is the expected outcome."""
    sys.path.insert(0, str(BENCHMARKS))
    from gpu_check import HALF_CONFIGS, refused

    model = toy_llava()
    model.model.language_model.config._attn_implementation = "flash_attention_2"  # declared: attach only
    assert refused(model, HALF_CONFIGS["tome"]).startswith("refused at attach")
    with pytest.raises(AssertionError, match="attached under flash_attention_2"):
        refused(model, HALF_CONFIGS["fastv"])  # pruning adds no key bias: it attaches


def test_vit_reference_path_must_hold_the_reference(tmp_path):
    done = run_benchmark("vit_throughput.py", "--smoke", "--reference", str(tmp_path))
    assert done.returncode != 0
    assert "facebookresearch/ToMe" in done.stderr


def test_ratio_row_flags_noise_and_verdict():
    sys.path.insert(0, str(BENCHMARKS))
    from common import ratio_row

    steady = PairedRatio(ratio=1.01, iqr=0.02, baseline_s=0.5, variant_s=0.505, repeats=9)
    noisy = PairedRatio(ratio=1.05, iqr=0.2, baseline_s=0.5, variant_s=0.525, repeats=9)
    assert ratio_row("a / b", steady, target=1.02).endswith("target <= 1.02: met")
    row = ratio_row("a / b", noisy, target=1.02)
    assert "NOISY (spread 19% > 10%)" in row and "target <= 1.02: MISSED" in row
    assert PAIRED_ROW.search(ratio_row("a / b", steady))
