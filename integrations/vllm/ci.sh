#!/usr/bin/env bash
# CI of the vLLM plug-in: its own virtualenv (vLLM's pins clash with the main one), then its tests.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$repo/.venv-vllm"
bash "$repo/integrations/vllm/setup-venv.sh" "$venv"
status=0
# tokenprune's own suite at the oldest versions it declares (vLLM's torch 2.13, transformers 5.19): the
# files that drive transformers' hooks, masks, rotary ids and caches (LLaVA, Qwen2-VL, Gemma 3), plus the
# layout and the light imports (6.5 minutes measured on the shared 2 cores); the other families reach the same hooks,
# strategy files are pure torch, the lab needs extras (datasets, lmms-eval) this virtualenv lacks
"$venv/bin/pip" install -q "import-linter>=2.1"  # grimp, for tests/test_layout.py
(cd "$repo" && "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_light_imports.py \
  tests/test_layout.py tests/test_attach.py tests/test_positions.py tests/test_sliding_window.py \
  tests/test_gemma3.py tests/test_cache_copies.py tests/test_qwen2_vl.py) || status=$?
plugin=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$repo/integrations/vllm/tests" || plugin=$?
if [ "$plugin" -eq 5 ]; then
  echo "the vLLM plug-in's pytest collected no tests: that is a failure" >&2
  exit 1
fi
[ "$plugin" -eq 0 ] || status=$plugin
# the serving benchmark at its smoke size (tests/test_benchmarks.py leaves it to this virtualenv)
(cd "$repo" && "$venv/bin/python" benchmarks/vllm_serving.py --smoke) || status=$?
exit "$status"
