#!/usr/bin/env bash
# Make a local stand-in for python:3.11-slim-bookworm when no registry can be reached
# (air-gapped sites, this project's development machines): Debian bookworm from a Debian mirror
# with debootstrap, Python 3.11 in a venv first on PATH, imported with `docker import`.
#
#   sudo docker/make-base-image.sh [TAG] [MIRROR]
#   docker build -f docker/Dockerfile --build-arg BASE=malaria-pipeline-base:bookworm -t malaria-pipeline:cpu .
#
# The host's CA bundle is copied in, so pip and apt inside the build trust the same
# certificates (a TLS-inspecting proxy, for instance) as this machine does.
# Needs root, debootstrap and a running Docker engine.
set -euo pipefail
TAG=${1:-malaria-pipeline-base:bookworm}
MIRROR=${2:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/base-rootfs.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR"
chroot "$ROOTFS" python3 -m venv /opt/python
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG"
echo "made $TAG"
