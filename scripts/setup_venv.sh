#!/usr/bin/env bash
# Create .venv on first use (CPU torch first: an unpinned torch would pull a multi-GB CUDA build), then
# install the requirements file given as $1. Sourced by demo.sh and test.sh.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -r "$1"
if [ "$1" = requirements-dev.txt ] && [ ! -d .venv/lib/python3*/site-packages/deepspeed ]; then
  # DeepSpeed (the ZeRO tests) ships as source only: built against the torch above, without compiled ops.
  .venv/bin/python -m pip install -q setuptools wheel
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation deepspeed==0.19.8
fi
