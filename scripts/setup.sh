#!/usr/bin/env bash
# Set up a development/evaluation machine (Debian 12): system packages, a virtualenv, cxr-node.
# Safe to run again. Installs packages with apt (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# What the node itself uses: the fonts of the PDF and page renditions (Latin, Greek, Arabic,
# Japanese, emoji) and Java for METEOR in `cxr-node eval`. The peers the tests talk to: Redis
# (broker), dcmtk (a modality), Orthanc with its DICOMweb plugin (a PACS), dicom3tools (the SR
# validator), poppler (pdftotext, pdfinfo), openssl (test certificates), Chromium (status page
# test), systemd-analyze (unit checks).
PACKAGES="redis-server dcmtk orthanc orthanc-dicomweb dicom3tools iproute2 openssl chromium systemd poppler-utils fonts-dejavu-core fonts-ipafont-gothic fonts-noto-color-emoji default-jre-headless"
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
# torch first and pinned, so that no dependency pulls in another build. Which build pip takes
# depends on where it looks: PyPI's torch 2.13.0 for Linux x86_64 is a CUDA build (several GB of
# CUDA libraries); a machine whose pip finds a 2.13.0+cpu wheel in its find-links takes that one.
# For the CPU build anywhere, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
TORCH="torch==2.13.0"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/python -m pip install -q --index-url "$TORCH_INDEX_URL" "$TORCH"
else
    .venv/bin/python -m pip install -q "$TORCH"
fi
.venv/bin/python -m pip install -q -e '.[dev]'

# Real radiology reports for the tests: the Indiana University chest X-ray reports (Open-i,
# CC BY-NC-ND 4.0, so not kept in this repository) as published inside the torchxrayvision wheel.
# The wheel is only downloaded, hash-checked, never installed; the tests read the archive from it.
TEST_DATA=.venv/share/cxr-node-test-data
mkdir -p "$TEST_DATA"
.venv/bin/python -m pip download -q --no-deps --require-hashes -d "$TEST_DATA" -r <(echo \
    "torchxrayvision==1.5.7 --hash=sha256:95f6c3475661f3515d4258deb0855bd5d1b1a56e0b65384251d3dd3fa61fac41")

.venv/bin/python -c 'import torch; print("torch", torch.__version__,
    "(CUDA " + torch.version.cuda + ")" if torch.version.cuda else "(CPU only)")'
echo "cxr-node installed in .venv"
