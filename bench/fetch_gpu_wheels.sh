#!/usr/bin/env bash
# Fetch the Python wheels that bench/gpu_check.py needs on the GPU machine and that its image lacks, into .whl/ (in
# the repository root, git-ignored), for a machine with no network: Python 3.12, x86-64 Linux (manylinux).
#
#     bash bench/fetch_gpu_wheels.sh             # then see docs/benchmarks.md, "GPU check"
#
# What the machine's image holds (/work/.library/device/KINDS.md, read 2026-11-17): torch 2.11, triton 3.6,
# transformers 5.17, peft, safetensors, sentencepiece, numpy, packaging, tqdm, pytest, pytest-xdist. Missing:
#   bitsandbytes   the reference side of stage 4 (transformers' BitsAndBytesConfig 4-bit NF4). Its own needs
#                  (Requires-Dist: torch>=2.4,<3; numpy>=1.17; packaging>=20.9) are all in the image, so it is
#                  fetched alone (--no-deps). 0.50.2 ships libbitsandbytes_cuda130.so, for the image's CUDA 13.
# Nothing else is missing: our own code needs torch, numpy, sentencepiece and tqdm only.
set -euo pipefail
cd "$(dirname "$0")/.."
BITSANDBYTES_VERSION="${BITSANDBYTES_VERSION:-0.50.2}"
mkdir -p .whl
rm -f .whl/bitsandbytes-*.whl        # one version only: two would stop the install there
# pip matches manylinux_2_N exactly, so name the tags the wheel may carry (bitsandbytes 0.50: manylinux_2_24).
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "bitsandbytes==${BITSANDBYTES_VERSION}"
git check-ignore -q .whl || { echo "fetch_gpu_wheels.sh: .whl/ is not git-ignored; refusing to leave wheels" \
                                   "where they could be committed" >&2; exit 1; }
ls -l .whl
