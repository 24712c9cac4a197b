#!/usr/bin/env bash
# What the test suite needs from the system beyond the venv: git (DVC and the clone tests)
# and Chromium (the MLflow UI test drives the system browser with Playwright), and a
# container engine (podman) for the image test. Installs
# what is missing with apt-get when it may (root, or sudo without a password); otherwise
# names the one command to run.
set -euo pipefail
need=()
command -v git >/dev/null || need+=(git)
[ -x /usr/bin/chromium ] || need+=(chromium chromium-driver)

# A container engine for tests/test_container.py (the image built and the DAG run in it):
# podman, configured and serving the Docker API (scripts/container_engine.sh). Where it
# cannot be had, that test says why and is skipped (IAGN_REQUIRE_CONTAINERS=1: fails).
containers() {
  [ "${IAGN_NO_CONTAINERS:-}" = 1 ] && return 0
  if bash "$(dirname "$0")/container_engine.sh" setup && bash "$(dirname "$0")/container_engine.sh" socket; then
    return 0
  fi
  echo "test_deps.sh: no container engine: tests/test_container.py will be skipped" >&2
  [ "${IAGN_REQUIRE_CONTAINERS:-}" != 1 ]
}

if ! ((${#need[@]})); then
  containers
  exit $?
fi

install="apt-get install -y ${need[*]}"
if ! command -v apt-get >/dev/null; then
  echo "the tests need ${need[*]} (Debian package names); install them with your package manager" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "the tests need ${need[*]}: run  sudo $install  then make test again" >&2
  exit 1
fi
echo "installing what the tests need: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
containers
