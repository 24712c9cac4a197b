#!/usr/bin/env bash
# A container engine for `make image` and `iagn-pipeline run-local --runner docker`, on a
# Debian machine without Docker: podman (+ buildah, runc, debootstrap for the base image).
#
#   bash scripts/container_engine.sh setup    # install (root or sudo) and configure podman
#   bash scripts/container_engine.sh socket   # serve the Docker API at $SOCKET (background)
#   bash scripts/container_engine.sh check    # exit 0 when a container can run here
#
# Configuration, written once to /etc/containers (what podman reads, whoever starts it):
# runc as the runtime (crun fails where cgroups are in hybrid mode) and no default ulimits
# (sandboxes refuse to raise them); the storage driver is overlay where the kernel mounts
# overlayfs here, else vfs (which copies every layer in full: watch the disk).
# The socket: /run/podman/podman.sock, the path `systemctl start podman.socket` uses, one
# of those run-local looks for when DOCKER_HOST is unset.
set -euo pipefail
SOCKET="${SOCKET:-/run/podman/podman.sock}"
CONF_DIR=/etc/containers/containers.conf.d
CONF="$CONF_DIR/50-iagn.conf"
STORAGE=/etc/containers/storage.conf

sudo_cmd() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    echo "container_engine.sh: needs root for: $*; run  sudo bash $0 setup" >&2
    return 1
  fi
}

overlay_works() {
  # The check podman makes itself, in the storage folder's file system.
  local dir
  sudo_cmd mkdir -p /var/lib/containers
  dir="$(sudo_cmd mktemp -d /var/lib/containers/overlay-check.XXXXXX)"
  sudo_cmd mkdir -p "$dir"/{lower,upper,work,merged}
  local ok=1
  if sudo_cmd mount -t overlay overlay \
    -o "lowerdir=$dir/lower,upperdir=$dir/upper,workdir=$dir/work" "$dir/merged" 2>/dev/null; then
    sudo_cmd umount "$dir/merged" && ok=0
  fi
  sudo_cmd rm -rf "$dir"
  return $ok
}

setup() {
  local need=()
  for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null || need+=("$tool")
  done
  if ((${#need[@]})); then
    command -v apt-get >/dev/null || {
      echo "container_engine.sh: install ${need[*]} with your package manager (Debian: apt-get install -y ${need[*]})" >&2
      exit 1
    }
    echo "container_engine.sh: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    sudo_cmd apt-get update -qq
    sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if [ ! -f "$CONF" ]; then
    sudo_cmd mkdir -p "$CONF_DIR"
    printf '%s\n' "# Written by iagn's scripts/container_engine.sh" \
      "[containers]" "default_ulimits = []" "[engine]" 'runtime = "runc"' |
      sudo_cmd tee "$CONF" >/dev/null
    echo "container_engine.sh: wrote $CONF (runc, no default ulimits)"
  fi
  if [ ! -f "$STORAGE" ]; then
    local driver=vfs
    overlay_works && driver=overlay
    printf '%s\n' "# Written by iagn's scripts/container_engine.sh" "[storage]" \
      "driver = \"$driver\"" 'runroot = "/run/containers/storage"' \
      'graphroot = "/var/lib/containers/storage"' | sudo_cmd tee "$STORAGE" >/dev/null
    echo "container_engine.sh: wrote $STORAGE (storage driver $driver)"
  fi
}

api_answers() {
  python3 - "$1" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
sys.exit(0 if b"OK" in s.recv(4096) else 1)
EOF
}

# PIDs of podman services whose working directory was deleted: they answer the API but every
# container they start fails ("write child: broken pipe"), so they are replaced.
stale_services() {
  local pid
  for pid in $(pgrep -f "podman system service" || true); do
    case "$(sudo_cmd readlink "/proc/$pid/cwd" 2>/dev/null)" in
      *" (deleted)") echo "$pid" ;;
    esac
  done
}

serve() {
  local stale
  stale=$(stale_services)
  if [ -n "$stale" ]; then
    echo "container_engine.sh: restarting podman system service (its working directory was deleted)"
    # shellcheck disable=SC2086  # one PID per word
    sudo_cmd kill $stale
    sleep 1
  fi
  if [ -S "$SOCKET" ] && api_answers "$SOCKET"; then
    echo "container_engine.sh: the Docker API answers at unix://$SOCKET"
    return 0
  fi
  command -v podman >/dev/null || {
    echo "container_engine.sh: podman is not installed: run  bash $0 setup" >&2
    exit 1
  }
  sudo_cmd mkdir -p "$(dirname "$SOCKET")"
  sudo_cmd rm -f "$SOCKET"
  # --time=0: no idle timeout; it lives until the machine (or CI job) ends. Started from /:
  # every container's monitor (conmon) inherits the service's working directory, and a
  # deleted one (the clone that first ran `make test`) fails every later container start
  # with "write child: broken pipe".
  (cd / && sudo_cmd nohup podman system service --time=0 "unix://$SOCKET" \
    >/tmp/iagn-podman-service.log 2>&1 &)
  for _ in $(seq 1 50); do
    if [ -S "$SOCKET" ] && api_answers "$SOCKET"; then
      echo "container_engine.sh: the Docker API answers at unix://$SOCKET (podman system service)"
      return 0
    fi
    sleep 0.2
  done
  echo "container_engine.sh: podman system service did not answer at $SOCKET; see /tmp/iagn-podman-service.log" >&2
  exit 1
}

check() {
  local engine
  for engine in podman docker; do
    command -v "$engine" >/dev/null || continue
    "$engine" info >/dev/null 2>&1 && return 0
  done
  return 1
}

case "${1:-}" in
  setup) setup ;;
  socket) serve ;;
  check) check ;;
  *)
    echo "usage: $0 setup|socket|check" >&2
    exit 2
    ;;
esac
