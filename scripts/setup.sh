#!/usr/bin/env bash
# Set up a development/evaluation machine (Debian 12): system packages, a virtualenv, cxr-node.
# Safe to run again. Installs packages with apt (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# The peers the tests talk to: Redis (broker), dcmtk (a modality), Orthanc (a PACS),
# dicom3tools (the SR validator), openssl (test certificates), Chromium (status page test),
# systemd-analyze (unit checks).
PACKAGES="redis-server dcmtk orthanc dicom3tools iproute2 openssl chromium systemd"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    # Packages must not start their services: Orthanc and Redis would listen on the machine.
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    $SUDO rm -f /usr/sbin/policy-rc.d
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch; an unpinned torch would pull several GB of CUDA libraries.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
echo "cxr-node installed in .venv"
