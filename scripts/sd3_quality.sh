#!/usr/bin/env bash
# The SD3 shapes benchmark (issue 20): train the SD3-shaped shapes teacher, distil it into LCM and PCM students
# (full and LoRA; the full LCM student twice, with w in [4, 6] and with w fixed at 5, which answers the guidance
# question), and measure all of them with benchmarks/quality.py against the teacher's Euler sampler.
#
#   bash scripts/sd3_quality.sh                     # on a GPU: the teacher in TEACHER_MINUTES (default 5)
#   STEPS=20 TEACHER_STEPS=20 bash scripts/sd3_quality.sh   # a smoke run of the plumbing (CPU is fine)
#
# PARALLEL=1 trains the five students at once (on a GPU, where tiny models leave it mostly idle); each writes
# $OUT/NAME.log then. TEACHER_INIT=FOLDER trains the teacher on from an earlier one (its VAE kept) into $TEACHER.
# The shipped teacher and benchmarks/results/quality_sd3.* came from, on one H200 (about 9 minutes):
#   PARALLEL=1 TEACHER_MINUTES=3 VAE_STEPS=1500 STEPS=2000 OUT=/tmp/sd3 bash scripts/sd3_quality.sh
#
# Writes $TEACHER (default assets/shapes-teacher-sd3; kept if it exists), the students under $OUT (default
# demo-output/sd3) and benchmarks/results/quality_sd3.{md,json,png} ($RESULT). The teacher runs at about 4 s per
# batch of 32 on 2 CPU cores: train it on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
TEACHER=${TEACHER:-assets/shapes-teacher-sd3} OUT=${OUT:-demo-output/sd3} RESULT=${RESULT:-benchmarks/results/quality_sd3}
STEPS=${STEPS:-4000} PROMPTS=${PROMPTS:-256}
export HF_HUB_OFFLINE=1
[ -e demo-output/shapes/train-00007.tar ] || "$PY" -m lcm_utils.shapes demo-output/shapes
if [ ! -e "$TEACHER/model_index.json" ]; then
    "$PY" scripts/train_demo_teacher.py --family sd3 --out "$TEACHER" --num_train 20000 --batch_size 256 \
        --vae_steps "${VAE_STEPS:-2000}" --unet_steps "${TEACHER_STEPS:-20000}" --unet_minutes "${TEACHER_MINUTES:-5}" \
        --width 96 --layers 6 --lr 1e-3 --warmup_steps 200 ${TEACHER_INIT:+--init_from "$TEACHER_INIT"}
fi
train() {  # train NAME SCRIPT FLAGS...: in the foreground, or in the background with PARALLEL=1
    if [ "${PARALLEL:-0}" = 1 ]; then
        mkdir -p "$OUT"
        PARALLEL=0 train "$@" > "$OUT/$1.log" 2>&1 &
        return
    fi
    local name=$1 script=$2
    shift 2
    "$PY" -m accelerate.commands.launch -q --num_processes 1 --num_machines 1 --dynamo_backend no \
        --mixed_precision "${MIXED_PRECISION:-no}" "$script" --config configs/demo-sd3.yaml \
        --pretrained_teacher_model "$TEACHER" --output_dir "$OUT/$name" --max_train_steps "$STEPS" "$@"
}
train lcm train_lcm_distill.py
train lcm-fixed-w train_lcm_distill.py --w_min 5 --w_max 5
train pcm train_lcm_distill.py --objective pcm --num_phases 4
train lcm-lora train_lcm_lora.py --lora_rank 16 --lora_alpha 16 --learning_rate 5e-4 --adam_weight_decay 0
train pcm-lora train_lcm_lora.py --lora_rank 16 --lora_alpha 16 --learning_rate 5e-4 --adam_weight_decay 0 \
    --objective pcm --num_phases 4
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
[ "$failed" = 0 ] || { tail -n 5 "$OUT"/*.log; echo "a student's training failed"; exit 1; }
"$PY" benchmarks/quality.py --teacher "$TEACHER" --full "$OUT/lcm" --lora "$OUT/lcm-lora" \
    --student "LCM (full, fixed w 5)=full:$OUT/lcm-fixed-w" --student "PCM (full)=full:$OUT/pcm" \
    --student "PCM-LoRA=lora:$OUT/pcm-lora" --guidance_scale 6 --num_prompts "$PROMPTS" --out "$RESULT"
