#!/usr/bin/env bash
# Build the component image with whichever container engine this machine has.
#   IMAGE=registry.example.com/iagn:0.1.0 TORCH_INDEX=... make image
set -euo pipefail
cd "$(dirname "$0")/.."
image="${IMAGE:-iagn:latest}"
commit="$(git rev-parse HEAD 2>/dev/null || true)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "warning: uncommitted changes are built in, but runs will name commit ${commit}" >&2
fi
args=(--build-arg "TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  --build-arg "IAGN_GIT_COMMIT=${commit}" -t "$image" .)
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  echo "building $image with docker"; exec docker build "${args[@]}"
elif command -v podman >/dev/null; then
  echo "building $image with podman"; exec podman build "${args[@]}"
elif command -v buildah >/dev/null; then
  echo "building $image with buildah"
  exec buildah bud --isolation chroot --storage-driver vfs "${args[@]}"
fi
echo "no container engine found: install docker, podman or buildah (or build on a CI runner);" >&2
echo "the Dockerfile is checked by hadolint in the tests (tests/test_dockerfile.py)" >&2
exit 1
