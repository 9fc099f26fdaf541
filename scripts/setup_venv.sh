#!/usr/bin/env bash
# Create .venv on first use (CPU torch first: an unpinned torch would pull a multi-GB CUDA build), then
# install the requirements file given as $1. Sourced by demo.sh and test.sh.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -r "$1"
