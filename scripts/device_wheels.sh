#!/usr/bin/env bash
# Run HERE (where PyPI is reachable), before a GPU session: downloads into .whl/ (git-ignored) the
# wheels the lent GPU machine lacks. Its image has Python 3.12, torch, numpy, pandas, h5py, click,
# tqdm, pyyaml, matplotlib, scipy and pytest, but not zarr; nothing can be fetched there.
# Then: device run(command="bash scripts/device_check.sh", carry=[".whl"], timeout_s=570).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
ls -l .whl
