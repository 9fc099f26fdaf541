#!/usr/bin/env bash
# Fill .whl/ with the wheels scripts/gpu_check.sh installs on a GPU machine that has torch, transformers,
# accelerate and peft but no network: diffusers, webdataset and DeepSpeed with what they need beyond that image
# (Python 3.12, x86-64). DeepSpeed ships as source only, so its wheel is built here without compiled ops (its
# kernels build on first use there); that needs .venv (scripts/setup_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl diffusers webdataset braceexpand importlib_metadata lazy-importer typing_extensions \
    hjson pydantic pydantic-core annotated-types typing-inspection
ls .whl/deepspeed-*.whl > /dev/null 2>&1 || DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps \
    --no-build-isolation deepspeed==0.19.8 -w .whl
ls -la .whl
