#!/usr/bin/env bash
# Builds llama.cpp's own server (llama-server) once, from the llama.cpp tree that the
# llama-cpp-python sdist on PyPI vendors (the only source we may download), and caches it:
#   $MODELFLEET_LLAMA_SERVER_CACHE/<version>/llama-server   (default ~/.cache/modelfleet/llama-server)
# A stamp next to the binary records the version and the build flags; when both match, the
# script says so and does nothing (a second install never rebuilds). About 5-8 minutes on 2
# cores the first time, progress shown.
#
# CPU flags: not -march=native (GGML_NATIVE). On some VMs the CPU advertises features
# (AVX512, AMX) that the hypervisor does not allow, and a native build dies with SIGILL. We
# build for x86-64-v3 (AVX2, FMA, F16C), which every x86 server of the last ten years runs;
# override with MODELFLEET_LLAMA_CMAKE_ARGS (e.g. "-DGGML_NATIVE=ON" on bare metal).
set -euo pipefail
# The whole script is one block: bash reads it completely before running, so an edit of this
# file during a long build cannot change what the running build does.
{
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${MODELFLEET_LLAMA_SERVER_CACHE:-$HOME/.cache/modelfleet/llama-server}
DEST="$CACHE/$VERSION"
PY=${PY:-python3.11}
PIP_PY=${PIP_PY:-.venv/bin/python}
[ -x "$PIP_PY" ] || PIP_PY=$PY
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
case "$(uname -m)" in
  x86_64|amd64)
    DEFAULT_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  *)
    DEFAULT_FLAGS="-DGGML_NATIVE=OFF" ;;
esac
FLAGS="-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF ${DEFAULT_FLAGS} ${MODELFLEET_LLAMA_CMAKE_ARGS:-}"
STAMP_TEXT="llama-cpp-python=$VERSION flags=$FLAGS"
if [ "${1:-}" = "--print-path" ]; then echo "$DEST/llama-server"; exit 0; fi

if [ -x "$DEST/llama-server" ] && [ -f "$DEST/stamp" ] && [ "$(cat "$DEST/stamp")" = "$STAMP_TEXT" ]; then
  echo "llama-server $VERSION: already built in $DEST (stamp matches), nothing to do"
  exit 0
fi

command -v cmake >/dev/null || { echo "llama-server: cmake is needed (apt-get install cmake)" >&2; exit 1; }
# The build folder stays until the binary is installed: an interrupted build resumes there.
WORK="$CACHE/build-$VERSION"
mkdir -p "$WORK"
rm -rf "$WORK/dl"
echo "==> llama-server $VERSION: fetching the llama-cpp-python sdist (vendors llama.cpp) from the package index"
SDIST="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  # --no-binary for this one package only: its build tools may come as wheels (fast).
  "$PIP_PY" -m pip --disable-pip-version-check download -q --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$WORK/dl"
  mkdir -p "$CACHE/sdist"
  mv "$WORK"/dl/llama_cpp_python-"$VERSION".tar.gz "$SDIST"
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
# Extracted once: extracting again would give every source a new time and rebuild it all.
[ -f "$SRC/CMakeLists.txt" ] || tar xzf "$SDIST" -C "$WORK"
[ -f "$SRC/CMakeLists.txt" ] || { echo "llama-server: no vendor/llama.cpp in the sdist" >&2; exit 1; }
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
echo "==> llama-server $VERSION: configuring ($FLAGS)"
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$WORK/build" "${GEN[@]}" $FLAGS >"$WORK/configure.log" 2>&1 \
  || { cat "$WORK/configure.log" >&2; exit 1; }
echo "==> llama-server $VERSION: compiling with $JOBS jobs (5-8 minutes on 2 cores, once)"
cmake --build "$WORK/build" --target llama-server -j "$JOBS"
BIN=$(find "$WORK/build" -name llama-server -type f -perm -u+x | head -1)
[ -n "$BIN" ] || { echo "llama-server: build produced no binary" >&2; exit 1; }
"$BIN" --version >/dev/null 2>&1 || { echo "llama-server: the built binary does not run on this CPU" >&2; exit 1; }
mkdir -p "$DEST"
install -m 0755 "$BIN" "$DEST/llama-server.tmp"
mv "$DEST/llama-server.tmp" "$DEST/llama-server"
printf '%s' "$STAMP_TEXT" >"$DEST/stamp"
echo "==> llama-server $VERSION: installed $DEST/llama-server"
rm -rf "$WORK"
exit 0
}
