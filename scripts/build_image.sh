#!/usr/bin/env bash
# Build the component image with whichever container engine works here (docker, podman,
# buildah), from a base image this machine can get:
#   make image                                            # IMAGE=... BASE_IMAGE=... TORCH_INDEX=...
#   IMAGE=registry.example.com/iagn:0.1.0 TORCH_INDEX=... make image
# When the default base (python:3.11-slim-bookworm) cannot be pulled, an equivalent one is
# built from Debian packages first (scripts/base_image.sh). When the default torch index
# (download.pytorch.org, CPU build) cannot be reached, torch comes from PyPI (its CUDA build:
# a much larger image) unless TORCH_INDEX says otherwise. A failed build leaves the previous
# image under the tag as it was: the engines tag only a finished build.
set -euo pipefail
cd "$(dirname "$0")/.."
image="${IMAGE:-iagn:latest}"
default_base="python:3.11-slim-bookworm"
base="${BASE_IMAGE:-$default_base}"
local_base="localhost/iagn-base:3.11-bookworm"
default_index="https://download.pytorch.org/whl/cpu"
index="${TORCH_INDEX:-$default_index}"
log="${BUILD_LOG:-${TMPDIR:-/tmp}/iagn-image-build.log}"

say() { echo "build_image.sh: $*"; }
fail() {
  echo "build_image.sh: $*" >&2
  exit 1
}

# --- the engine: the first that is installed and answers ------------------------------------
find_engine() {
  engine=""
  broken=""
  for candidate in docker podman buildah; do
    command -v "$candidate" >/dev/null || continue
    if "$candidate" info >/dev/null 2>"${TMPDIR:-/tmp}/iagn-engine-info.err"; then
      # A docker CLI talking to podman's Docker API: podman builds (BuildKit's cache and
      # secret mounts need podman's own builder) into the same image store.
      if [ "$candidate" = docker ] && command -v podman >/dev/null &&
        docker version --format '{{range .Server.Components}}{{.Name}}{{end}}' 2>/dev/null | grep -qi podman; then
        continue
      fi
      engine="$candidate"
      return 0
    fi
    broken="${broken:+$broken; }$candidate: $(tail -n 1 "${TMPDIR:-/tmp}/iagn-engine-info.err")"
  done
  return 1
}
# None that works, on a Debian machine as root: podman, as `make test` sets it up
# (IAGN_NO_ENGINE_SETUP=1 to only say what to do).
if ! find_engine && [ -z "${IAGN_NO_ENGINE_SETUP:-}" ] && [ "$(id -u 2>/dev/null)" = 0 ] &&
  command -v apt-get >/dev/null; then
  say "no working container engine: setting up podman (bash scripts/container_engine.sh setup)"
  bash scripts/container_engine.sh setup && find_engine || true
fi
if [ -z "$engine" ]; then
  if [ -n "$broken" ]; then
    fail "a container engine is installed but does not work ($broken):" \
      "run  bash scripts/container_engine.sh setup  (as root: runc runtime, no default ulimits)" \
      "or start the docker daemon"
  fi
  echo "no container engine found: install docker, podman or buildah" \
    "(Debian: apt-get install -y podman buildah runc debootstrap, or bash scripts/container_engine.sh setup);" \
    "the Dockerfile is checked by hadolint in the tests (tests/test_dockerfile.py)" >&2
  exit 1
fi

has_image() {
  case "$engine" in
    docker) docker image inspect "$1" >/dev/null 2>&1 ;;
    *) "$engine" image exists "$1" 2>/dev/null || "$engine" inspect "$1" >/dev/null 2>&1 ;;
  esac
}

# --- the base image ---------------------------------------------------------------------------
if ! has_image "$base"; then
  say "pulling $base"
  if ! timeout 120 "$engine" pull "$base" >/dev/null 2>&1; then
    if [ "$base" != "$default_base" ]; then
      fail "cannot pull BASE_IMAGE=$base: set BASE_IMAGE to an image this machine has or can" \
        "pull, or build one from Debian packages with  bash scripts/base_image.sh  and pass" \
        "BASE_IMAGE=$local_base"
    fi
    if ! has_image "$local_base"; then
      say "cannot pull $base (no registry reachable?): building $local_base from Debian packages"
      ENGINE="$engine" bash scripts/base_image.sh "$local_base" ||
        fail "neither $base nor a Debian base could be had: set BASE_IMAGE to a Python 3.11" \
          "bookworm image this machine has"
    fi
    say "using $local_base (Debian bookworm's Python 3.11) instead of $base"
    base="$local_base"
  fi
fi

# --- the torch index ------------------------------------------------------------------------
reachable() {
  if command -v curl >/dev/null; then
    curl -sf -o /dev/null -m 15 "$1/torch/"
  elif command -v python3 >/dev/null; then
    python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)" "$1/torch/" 2>/dev/null
  else
    return 0 # no way to check: let pip say
  fi
}
if [ -z "${TORCH_INDEX:-}" ] && ! reachable "$index"; then
  index="https://pypi.org/simple"
  say "note: $default_index is not reachable: torch from PyPI instead (its CUDA build, several" \
    "GB larger); pass TORCH_INDEX=<a reachable CPU wheel index> for the slim CPU image"
fi

commit="$(git rev-parse HEAD 2>/dev/null || true)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "warning: uncommitted changes are built in, but runs will name commit ${commit}" >&2
fi
args=(--build-arg "BASE_IMAGE=$base" --build-arg "TORCH_INDEX=$index"
  --build-arg "IAGN_GIT_COMMIT=${commit}")
# pip inside the build trusts what pip here trusts (a TLS-inspecting proxy's CA): the bundle
# is a build secret, mounted only while pip runs, in no layer.
ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
[ -n "$ca" ] || ca="$(pip config get global.cert 2>/dev/null || true)"
if [ -n "$ca" ] && [ -s "$ca" ]; then
  args+=(--secret "id=pip-ca,src=$ca")
fi
args+=(-t "$image" .)
# PyPI and Debian are reached over the host's network (the default bridge may have no route).
case "$engine" in
  docker) cmd=(env DOCKER_BUILDKIT=1 docker build --network host "${args[@]}") ;;
  podman) cmd=(podman build --network host --layers "${args[@]}") ;;
  buildah) cmd=(buildah bud --isolation chroot --network host --layers "${args[@]}") ;;
esac
say "building $image with $engine (base $base, torch from $index; log $log)"
echo "building $image with $engine"
start=$SECONDS
if ! "${cmd[@]}" 2>&1 | tee "$log"; then
  if grep -qE "pip install|ERROR: (Could not|No matching|Cannot install|ResolutionImpossible)|pip check" "$log"; then
    error="$(grep -E '^(ERROR|error):' "$log" | tail -n 1 || true)"
    fail "the build failed in pip (${error:-see $log}); $image is unchanged." \
      "Check that PyPI and TORCH_INDEX=$index are reachable from here (a CPU index:" \
      "TORCH_INDEX=https://download.pytorch.org/whl/cpu; PyPI's CUDA build:" \
      "TORCH_INDEX=https://pypi.org/simple) and pyproject.toml's pins"
  fi
  fail "the build failed (log $log); $image is unchanged"
fi
size="$("$engine" image inspect --format '{{.Size}}' "$image" 2>/dev/null || true)"
[[ "$size" =~ ^[0-9]+$ ]] && size=", $((size / 1000000)) MB" || size=""
say "built $image in $((SECONDS - start)) s$size"
