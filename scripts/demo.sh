#!/usr/bin/env bash
# The embedded default: install into .venv, write the shapes dataset, distill the shipped shapes teacher
# (assets/shapes-teacher) on CPU with configs/demo.yaml, then draw the teacher-vs-student comparison grid.
#   bash scripts/demo.sh           full distillation   -> demo-output/lcm, demo-output/comparison.png
#   bash scripts/demo.sh --lora    LCM-LoRA            -> demo-output/lcm-lora, demo-output/comparison-lora.png
# Further arguments go to the training script (e.g. --max_train_steps 100).
set -euo pipefail
cd "$(dirname "$0")/.."
script=train_lcm_distill.py config=configs/demo.yaml model=demo-output/lcm compare=() out=comparison.png
if [ "${1:-}" = "--lora" ]; then
  shift
  script=train_lcm_lora.py config=configs/demo-lora.yaml model=demo-output/lcm-lora compare=(--lora)
  out=comparison-lora.png
fi
. scripts/setup_venv.sh requirements.txt
export HF_HUB_OFFLINE=1
[ -e demo-output/shapes/train-00007.tar ] || .venv/bin/python -m lcm_utils.shapes demo-output/shapes
# -q and every launcher value given: a mistake in a flag reads as the script's one error line, nothing more.
.venv/bin/accelerate launch -q --cpu --num_processes 1 --num_machines 1 --num_cpu_threads_per_process 2 \
  --mixed_precision no --dynamo_backend no "$script" --config "$config" "$@"
.venv/bin/python scripts/compare.py --teacher assets/shapes-teacher --model "$model" "${compare[@]}" \
  --out "demo-output/$out"
