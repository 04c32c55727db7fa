#!/usr/bin/env bash
# Build a Debian bookworm base image with debootstrap and import it into podman
# (or docker) as localhost/mpitrain-base:bookworm -- for machines that reach a
# Debian mirror but no container registry.  With a registry, skip this and use
# the Dockerfile's default base (debian:bookworm-slim).
#
# Usage: docker/build-base.sh [--engine podman|docker] [--tag TAG] [--mirror URL]
# Env:   MT_IMAGE_CACHE  folder for the cached rootfs tarball (/var/cache/mpitrain)
#
# The tarball is cached: a rerun only re-imports it (seconds).  Needs root and
# the debootstrap package.
set -euo pipefail

ENGINE=${ENGINE:-podman}
TAG=localhost/mpitrain-base:bookworm
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-}
CACHE=${MT_IMAGE_CACHE:-/var/cache/mpitrain}

while [ $# -gt 0 ]; do
  case "$1" in
    --engine) ENGINE=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --mirror) MIRROR=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build-base.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ -z "$MIRROR" ]; then
  # The mirror this host's apt uses (deb822 "URIs:" or one-line "deb URL").
  MIRROR=$(grep -hs -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
             /etc/apt/sources.list.d/*.list 2>/dev/null \
           | grep -E 'debian/?$|debian[[:space:]]' | grep -v security \
           | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
           | awk '{print $1; exit}' || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

TARBALL="$CACHE/debian-$SUITE-minbase.tar"
if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || { echo "build-base.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  mkdir -p "$CACHE"
  ROOT=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$ROOT"' EXIT
  echo "build-base.sh: debootstrap $SUITE from $MIRROR" >&2
  debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv \
    "$SUITE" "$ROOT" "$MIRROR" >&2
  # apt sources inside the image: the same mirror.
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" \
    > "$ROOT/etc/apt/sources.list"
  rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
  tar -C "$ROOT" --numeric-owner -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
fi

"$ENGINE" import --change 'CMD ["/bin/bash"]' "$TARBALL" "$TAG" >/dev/null
echo "$TAG"
