#!/usr/bin/env bash
# llmservice launcher: creates .venv and installs the requirements on first use (and whenever a
# requirements file changes), then runs the service or the tests.
#   ./start_service.sh            start the service on the embedded default models (reads .env)
#   ./start_service.sh test [...] run the test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON_BIN="${PYTHON:-}"
if [ -z "$PYTHON_BIN" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON_BIN="$candidate"; break; fi
  done
fi
[ -n "$PYTHON_BIN" ] || { echo "llmservice: Python 3.11 is required" >&2; exit 1; }

mode="${1:-serve}"
if [ "$mode" = "test" ]; then shift; requirements=requirements-dev.txt; else requirements=requirements.txt; fi

if [ ! -x .venv/bin/python ]; then
  echo "llmservice: creating .venv" >&2
  "$PYTHON_BIN" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt "$requirements" | sha256sum | cut -c1-16)-$requirements"
# llama.cpp is built for this CPU (-march=native) but without AMX: some virtual machines report AMX
# and then fault on its tile instructions ("Illegal instruction" in ggml_backend_amx_mul_mat).
AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_C_FLAGS=\"$AMX_OFF\" -DCMAKE_CXX_FLAGS=\"$AMX_OFF\"}"
if [ ! -f "$stamp" ]; then
  echo "llmservice: installing $requirements (the first run builds llama-cpp-python from source: ~7-15 minutes)" >&2
  .venv/bin/python -m pip install --disable-pip-version-check -q -r "$requirements"
  touch "$stamp"
fi

# glibc's per-thread arenas keep the high-water mark of torch's varying tensor sizes: with these the
# soak benchmark's memory stays flat after warm-up (BENCHMARKS.md, Soak). Set them yourself to override.
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}" MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-65536}"

if [ "$mode" = "test" ]; then
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python server.py
