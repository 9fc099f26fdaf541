#!/usr/bin/env bash
# The embedded default: install into .venv, build a tiny SD teacher and toy images, distill it on CPU,
# then sample the result with a stock diffusers pipeline + LCMScheduler.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_venv.sh requirements.txt
export HF_HUB_OFFLINE=1
[ -d demo-output/assets/teacher ] || .venv/bin/python -m lcm_utils.tiny demo-output/assets
.venv/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_lcm_distill.py --config configs/demo.yaml "$@"
.venv/bin/python scripts/sample.py --teacher demo-output/assets/teacher --model demo-output/lcm \
  --prompt "a red square" --steps 4 --out demo-output/sample.png
