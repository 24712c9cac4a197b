#!/usr/bin/env bash
# A Python 3.11 base image built from Debian packages, for machines that cannot pull
# python:3.11-slim-bookworm (no route to Docker Hub) but reach deb.debian.org:
#   scripts/base_image.sh [TAG]          # default localhost/iagn-base:3.11-bookworm
# then  make image BASE_IMAGE=localhost/iagn-base:3.11-bookworm  (make image does both
# by itself when the default base cannot be pulled).
#
# What it holds is what the Dockerfile expects of python:3.11-slim-bookworm: Debian
# bookworm, `python3` 3.11 with the venv module (the Dockerfile makes its own venv),
# CA certificates for pip, apt for the git layer. No compiler, no pip in the system Python.
# Needs root (debootstrap, chroot) and about a minute; the rootfs is a temporary folder.
set -euo pipefail
tag="${1:-localhost/iagn-base:3.11-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
engine="${ENGINE:-}"
if [ -z "$engine" ]; then
  for candidate in podman buildah docker; do
    if command -v "$candidate" >/dev/null; then engine="$candidate"; break; fi
  done
fi
[ -n "$engine" ] || {
  echo "base_image.sh: no container engine: run  apt-get install -y podman buildah runc debootstrap" >&2
  exit 1
}
command -v debootstrap >/dev/null || {
  echo "base_image.sh: debootstrap is missing: run  apt-get install -y debootstrap" >&2
  exit 1
}
[ "$(id -u)" -eq 0 ] || {
  echo "base_image.sh: debootstrap needs root: run  sudo $0 $tag" >&2
  exit 1
}

rootfs="$(mktemp -d /var/tmp/iagn-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "base_image.sh: debootstrap bookworm (python3, python3-venv) from $mirror"
# minbase: apt, dpkg, passwd (useradd) and coreutils; python3-venv brings ensurepip.
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
  tail -n 20 "$rootfs.log" >&2
  echo "base_image.sh: debootstrap failed (above); check that $mirror is reachable or set DEBIAN_MIRROR" >&2
  rm -f "$rootfs.log"
  exit 1
fi
rm -f "$rootfs.log"
# Smaller layer: apt's package lists and downloaded .debs, docs and man pages are not needed.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
changes=(--change 'ENV LANG=C.UTF-8' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["python3"]')
case "$engine" in
  podman) tar -C "$rootfs" -c . | podman import "${changes[@]}" - "$tag" >/dev/null ;;
  docker) tar -C "$rootfs" -c . | docker import "${changes[@]}" - "$tag" >/dev/null ;;
  buildah)
    container="$(buildah from scratch)"
    tar -C "$rootfs" -c . | buildah add "$container" - /
    buildah config --env LANG=C.UTF-8 --cmd python3 "$container"
    buildah commit --rm "$container" "$tag" >/dev/null
    ;;
esac
echo "base_image.sh: built $tag"
