#!/usr/bin/env bash
# GPU smoke check: mixed-precision training, checkpoint/resume, validation and sampling on CUDA with the tiny
# teacher; the same for SDXL in fp16 and SD3 in bf16 on tiny teachers (sampled by scripts/sample.py); the step under
# PyTorch's sync debug mode (scripts/sync_check.py); FSDP2 and DeepSpeed ZeRO-2/3 with the shipped configs; then
# the benchmarks (teacher batching, throughput, memory) at Stable Diffusion 1.5's shapes and the memory/speed rows
# at SDXL's (1024 px, fp16; GPU_CHECK_NO_SDXL=1 leaves them out) and SD3.5 Large's (bf16; GPU_CHECK_NO_SD35=1), on
# random teachers of 2.6 B and 8.1 B parameters built first. Offline. On one H200 (2026-12-04) each launch spent
# 15-30 s starting up, and the whole check needs more than one 10-minute call: GPU_CHECK_ONLY runs a part
# (docs/testing.md, "On a GPU"). scripts/gpu_wheels.sh fills .whl/ for a machine without diffusers or DeepSpeed.
#
#   OUT=/some/folder bash scripts/gpu_check.sh
#
# Writes $OUT/gpu_check.log (everything) and $OUT/images.tar: samples.png (stock-pipeline samples of each SD output,
# 8x upscaled), sample_*.png (scripts/sample.py on the other outputs) and val_*.png (the runs' validation grids).
# Each step prints PASS or FAIL; a failed step does not stop the others. The training checks run in five lanes at
# once beside the memory benchmarks. Wheels in .whl/ (diffusers, webdataset, deepspeed, ...) are installed to
# /tmp/site first when present, unless GPU_CHECK_NO_WHEELS=1. Without CUDA (a dry run of the plumbing on CPU) the
# mixed-precision runs use --mixed_precision no and the benchmarks use small shapes; GPU_CHECK_SMALL=1 picks the
# small shapes on a GPU too.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the log and images}
mkdir -p "$OUT"
export ROOT=$PWD W=${GPU_CHECK_WORK:-/tmp/gpu_check} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10 OUT
BUDGET=${GPU_CHECK_BUDGET:-600}  # seconds for all steps; a step is cut to what is left, and skipped under 20 s
# GPU_CHECK_ONLY: a regular expression; only the steps whose names match it run (a rerun of failed ones; "assets"
# builds the tiny teacher and shards most training steps read).
DEADLINE=$((SECONDS + BUDGET))

selected() {  # selected NAME: the step is to run (GPU_CHECK_ONLY unset, or its name matches)
    [ -z "${GPU_CHECK_ONLY:-}" ] || [[ $1 =~ $GPU_CHECK_ONLY ]]
}

step() {  # step NAME LIMIT_S FUNCTION: run FUNCTION under a time limit, print PASS/FAIL, never stop the script
    local name=$1 limit=$2 fn=$3 t0=$SECONDS rc left=$((DEADLINE - SECONDS))
    echo
    if ! selected "$name"; then
        RESULTS+=("SKIP $name (not in GPU_CHECK_ONLY)")
        return
    fi
    if [ "$left" -lt 20 ]; then
        echo "=== SKIP $name (out of time: GPU_CHECK_BUDGET=${BUDGET}s)"
        RESULTS+=("SKIP $name (out of time)")
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== [$name] start (limit ${limit}s, at ${SECONDS}s)"
    timeout -k 10 "$limit" bash -c "set -o pipefail; $fn"
    rc=$?
    echo  # a killed progress bar leaves its line open
    local took=$((SECONDS - t0)) why=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && why=", timed out"
    if [ $rc -eq 0 ]; then
        echo "=== PASS $name (${took}s)"
        RESULTS+=("PASS $name (${took}s)")
    else
        echo "=== FAIL $name (rc $rc$why, ${took}s)"
        RESULTS+=("FAIL $name (rc $rc$why, ${took}s)")
    fi
}

launch() {  # launch SCRIPT PRECISION FLAGS...: accelerate launch, one process; precision "no" without CUDA.
    # With ENGINE=an accelerate config (FSDP, DeepSpeed): under it (on CPU through tests/engine_on_cpu.py, as the
    # tests run it; DeepSpeed then uses its own CPU accelerator, not accelerate's CPU mode).
    local script=$1 mp=$2 target=("$ROOT/$1") mode=(--num_processes 1) cpu_env=()
    shift 2
    if [ -n "${ENGINE:-}" ]; then
        mode=(--config_file "$ROOT/$ENGINE" --num_processes 1 --main_process_port "${GPU_CHECK_PORT:-29500}")
        [ "$HAS_CUDA" = 1 ] || target=("$ROOT/tests/engine_on_cpu.py" "${target[@]}")
    fi
    if [ "$HAS_CUDA" != 1 ]; then
        mp=no
        if [ -n "${ENGINE:-}" ] && grep -q "distributed_type: DEEPSPEED" "$ROOT/$ENGINE"; then
            cpu_env=(-u ACCELERATE_USE_CPU)
        else
            [ -n "${ENGINE:-}" ] || mode=(--cpu --num_processes 1)
            cpu_env=(ACCELERATE_USE_CPU=1)
        fi
    fi
    env "${cpu_env[@]}" python3 -m accelerate.commands.launch "${mode[@]}" --num_machines 1 --mixed_precision "$mp" \
        --dynamo_backend no "${target[@]}" --mixed_precision "$mp" "$@"
}

tiny_flags() {  # tests/conftest.py base_args, with the shards, checkpoints at 10 and 20, validation at the end
    echo --pretrained_teacher_model "$W/teacher" --train_shards_path_or_url "$W/shards/{00000..00003}.tar" \
        --resolution 16 --train_batch_size 4 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 0 \
        --num_ddim_timesteps 50 --checkpointing_steps 10 --checkpoints_total_limit 2
}

train_and_resume() {  # train_and_resume SCRIPT PRECISION NAME FLAGS...: 20 steps, then resume from latest to 25
    local script=$1 mp=$2 name=$3 log
    shift 3
    local out=$W/$name
    rm -rf "$out"
    # shellcheck disable=SC2046
    launch "$script" "$mp" $(tiny_flags) --output_dir "$out" --max_train_steps 20 --validation_steps 20 \
        --validation_prompts "a red square" "a blue circle" --validation_inference_steps 1 2 4 "$@" || return 1
    local weights="unet/diffusion_pytorch_model.safetensors unet_target"
    [ "$script" = train_lcm_lora.py ] && weights=pytorch_lora_weights.safetensors
    for f in $weights scheduler/scheduler_config.json checkpoint-10 checkpoint-20 validation/step-000020.png; do
        [ -e "$out/$f" ] || { echo "missing $out/$f"; return 1; }
    done
    log=$W/$name.resume.log
    # shellcheck disable=SC2046
    launch "$script" "$mp" $(tiny_flags) --output_dir "$out" --max_train_steps 25 --validation_steps 25 \
        --validation_prompts "a red square" "a blue circle" --validation_inference_steps 1 2 4 \
        --resume_from_checkpoint latest "$@" 2>&1 | tee "$log" || return 1
    grep -q "resumed from $out/checkpoint-20 at step 20" "$log" || { echo "no 'resumed from checkpoint-20'"; return 1; }
    [ -e "$out/validation/step-000025.png" ] || { echo "missing validation/step-000025.png"; return 1; }
}

# FSDP2 with the shipped config on one GPU in bf16 (FSDP's own mixed precision: bf16 compute, fp32 shards), full
# distillation with its sharded EMA target and LCM-LoRA, each trained, checkpointed and resumed from latest, then
# sampled in a stock pipeline. Several processes are tested on CPU (tests/test_engines.py).
s_fsdp() {
    ENGINE=configs/accelerate_fsdp.yaml train_and_resume train_lcm_distill.py bf16 full_fsdp || return 1
    ENGINE=configs/accelerate_fsdp.yaml train_and_resume train_lcm_lora.py bf16 lora_fsdp --lora_rank 8 \
        --lora_alpha 8 || return 1
    for run in full_fsdp lora_fsdp; do
        python3 scripts/sample.py --model "$W/$run" --steps 1 4 --out "$OUT/sample_$run.png" || return 1
    done
}
# DeepSpeed with the shipped configs on one GPU: ZeRO-2 in fp16 (DeepSpeed's loss scaler) for full distillation
# and LoRA, ZeRO-3 in bf16 for full distillation; each trained, checkpointed, resumed and sampled.
s_deepspeed() {
    python3 -c "import deepspeed" 2>/dev/null || { echo "deepspeed is not importable: pip install deepspeed"; return 1; }
    ENGINE=configs/accelerate_deepspeed_zero2.yaml train_and_resume train_lcm_distill.py fp16 full_zero2 || return 1
    ENGINE=configs/accelerate_deepspeed_zero2.yaml train_and_resume train_lcm_lora.py fp16 lora_zero2 --lora_rank 8 \
        --lora_alpha 8 || return 1
    ENGINE=configs/accelerate_deepspeed_zero3.yaml train_and_resume train_lcm_distill.py bf16 full_zero3 || return 1
    for run in full_zero2 lora_zero2 full_zero3; do
        python3 scripts/sample.py --model "$W/$run" --steps 1 4 --out "$OUT/sample_$run.png" || return 1
    done
}

# ---------------------------------------------------------------------------------------------------- the steps
s_wheels() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

s_versions() {
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "webdataset", "huggingface_hub",
             "safetensors", "numpy", "PIL"):
    try:
        m = importlib.import_module(name)
        print(f"{name:16} {getattr(m, '__version__', '?'):14} {m.__file__}")
    except Exception as e:
        print(f"{name:16} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
}

s_assets() {
    rm -rf "$W/teacher" "$W/shards"
    python3 -c "
import os, sys
sys.path.insert(0, os.environ['ROOT'])
from lcm_utils.tiny import build_tiny_teacher, build_wds_shards
W = os.environ['W']
print(build_tiny_teacher(os.path.join(W, 'teacher'), 'epsilon', seed=0))
print(build_wds_shards(os.path.join(W, 'shards'), num_shards=4, per_shard=16, size=20))
"
}

# SD3 in bf16 on the tiny SD3 teachers (with T5; without it, SD3.5's dual attention): full PCM distillation (cast
# teacher, validation through StableDiffusion3Pipeline) and LCM-LoRA with --without_t5, each then sampled by
# scripts/sample.py. The flow-matching family's GPU paths (T5's fp32 modules in a bf16 encoder, the transformer in
# bf16 under autocast).
s_sd3_bf16() {
    rm -rf "$W/sd3" "$W/sd3_no_t5" "$W/sd3_full" "$W/sd3_lora"
    python3 -c "
import os, sys
sys.path.insert(0, os.environ['ROOT'])
from lcm_utils.tiny import build_tiny_sd3_teacher
W = os.environ['W']
build_tiny_sd3_teacher(os.path.join(W, 'sd3'), seed=4)
build_tiny_sd3_teacher(os.path.join(W, 'sd3_no_t5'), seed=5, with_t5=False, dual_attention=True)
" || return 1
    local common=(--train_shards_path_or_url "$W/shards/{00000..00003}.tar" --resolution 16 --train_batch_size 4
        --max_train_steps 6 --validation_steps 6 --validation_prompts "a red square" --validation_inference_steps 1 2
        --report_to none --seed 0 --cast_teacher_unet)
    launch train_lcm_distill.py bf16 "${common[@]}" --pretrained_teacher_model "$W/sd3_no_t5" \
        --output_dir "$W/sd3_full" --objective pcm --num_phases 2 || return 1
    launch train_lcm_lora.py bf16 "${common[@]}" --pretrained_teacher_model "$W/sd3" --without_t5 \
        --output_dir "$W/sd3_lora" --lora_rank 4 || return 1
    for run in sd3_full sd3_lora; do
        [ -f "$W/$run/validation/step-000006.png" ] || { echo "no validation grid in $run"; return 1; }
        python3 scripts/sample.py --model "$W/$run" --steps 1 2 --out "$OUT/sample_$run.png" || return 1
    done
}

# SDXL in fp16 on the tiny SDXL teacher: full distillation (cast teacher, validation grid decoded by an fp32 VAE)
# and LCM-LoRA from LAION-style shards with filters, each then sampled by scripts/sample.py in a stock
# StableDiffusionXLPipeline. The GPU paths of the SDXL family that no CPU test can take.
s_sdxl_fp16() {
    rm -rf "$W/sdxl" "$W/sdxl_shards" "$W/sdxl_full" "$W/sdxl_lora"
    python3 -c "
import os, sys
sys.path.insert(0, os.environ['ROOT'])
from lcm_utils.tiny import build_tiny_sdxl_teacher, build_wds_shards
W = os.environ['W']
build_tiny_sdxl_teacher(os.path.join(W, 'sdxl'), seed=2)
print(build_wds_shards(os.path.join(W, 'sdxl_shards'), num_shards=2, per_shard=16, size=24, with_json=True))
" || return 1
    local common=(--pretrained_teacher_model "$W/sdxl" --train_shards_path_or_url "$W/sdxl_shards/{00000..00001}.tar"
        --max_train_samples 32 --resolution 16 --train_batch_size 4 --max_train_steps 6 --validation_steps 6
        --validation_prompts "a red square" --validation_inference_steps 1 2 --report_to none --seed 0
        --min_original_size 400 --random_flip)
    launch train_lcm_distill.py fp16 "${common[@]}" --output_dir "$W/sdxl_full" --cast_teacher_unet || return 1
    launch train_lcm_lora.py fp16 "${common[@]}" --output_dir "$W/sdxl_lora" --lora_rank 4 --cast_teacher_unet \
        || return 1
    for run in sdxl_full sdxl_lora; do
        [ -f "$W/$run/validation/step-000006.png" ] || { echo "no validation grid in $run"; return 1; }
        python3 scripts/sample.py --model "$W/$run" --steps 1 4 --out "$OUT/sample_$run.png" || return 1
    done
}

# fp16: teacher cast to fp16, 2 data workers, tensorboard logging of scalars and grids.
s_full_fp16() {
    train_and_resume train_lcm_distill.py fp16 full_fp16 --cast_teacher_unet --dataloader_num_workers 2 \
        --report_to tensorboard
}
# bf16: fp32 teacher under autocast, gradient checkpointing, TF32.
s_full_bf16() {
    train_and_resume train_lcm_distill.py bf16 full_bf16 --gradient_checkpointing --allow_tf32 \
        --report_to tensorboard
}
s_lora_fp16() {
    local out=$W/lora_fp16
    rm -rf "$out"
    # shellcheck disable=SC2046
    launch train_lcm_lora.py fp16 $(tiny_flags) --output_dir "$out" --max_train_steps 20 --validation_steps 20 \
        --validation_prompts "a red square" "a blue circle" --validation_inference_steps 1 2 4 \
        --lora_rank 8 --lora_alpha 8 --cast_teacher_unet --report_to tensorboard || return 1
    for f in pytorch_lora_weights.safetensors scheduler/scheduler_config.json checkpoint-20 validation/step-000020.png; do
        [ -e "$out/$f" ] || { echo "missing $out/$f"; return 1; }
    done
}

s_losses() {  # every logged train/loss of the three runs is finite (fp16 overflow would show here first)
    python3 - <<'EOF'
import glob, math, os
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

bad = []
for run in ("full_fp16", "full_bf16", "lora_fp16"):
    losses = {}
    for f in sorted(glob.glob(os.path.join(os.environ["W"], run, "logs", "**", "events.out.tfevents*"), recursive=True)):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            losses.update({e.step: e.value for e in acc.Scalars("train/loss")})
    steps = sorted(losses)
    finite = all(math.isfinite(v) for v in losses.values())
    print(f"{run:<10} {len(steps)} logged steps ({steps[0] if steps else '-'}..{steps[-1] if steps else '-'}), "
          f"all finite {finite}: " + " ".join(f"{losses[s]:.3g}" for s in steps))
    if not steps or not finite:
        bad.append(run)
assert not bad, bad
EOF
}

s_sample() {  # load each output with stock diffusers pipelines in fp16 on cuda (fp32 on CPU), as the README does
    python3 - <<'EOF'
import os
import numpy as np
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

W = os.environ["W"]
teacher = os.path.join(W, "teacher")
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
kw = dict(safety_checker=None, requires_safety_checker=False, dtype=dtype)
images, failures = [], []


def sample(pipe, label, guidance, steps=4):
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red square", num_inference_steps=steps, guidance_scale=guidance, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    ok = bool(np.isfinite(img).all() and img.max() > 0.01)
    print(f"{label:<44} {'ok ' if ok else 'BAD'} shape {img.shape} min {np.nanmin(img):.3f} max {np.nanmax(img):.3f} "
          f"mean {np.nanmean(img):.3f} finite {bool(np.isfinite(img).all())}")
    if not ok:
        failures.append(label)
    images.append(np.nan_to_num(img))
    return img


for run in ("full_fp16", "full_bf16"):
    out = os.path.join(W, run)
    if not os.path.isdir(os.path.join(out, "unet")):
        print(f"{run}: no output to sample"); failures.append(run); continue
    scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    print(f"{run}: scheduler timestep_scaling {scheduler.config.timestep_scaling}, "
          f"original_inference_steps {scheduler.config.original_inference_steps}")
    for sub in ("unet", "unet_target"):
        unet = UNet2DConditionModel.from_pretrained(out, subfolder=sub, dtype=dtype)
        pipe = StableDiffusionPipeline.from_pretrained(teacher, unet=unet, scheduler=scheduler, **kw).to(device)
        sample(pipe, f"{run}/{sub} StableDiffusionPipeline 4 steps", 6.0)
        if sub == "unet":
            sample(pipe, f"{run}/{sub} StableDiffusionPipeline 1 step", 6.0, steps=1)
            lcm = LatentConsistencyModelPipeline.from_pretrained(teacher, unet=unet, scheduler=scheduler, **kw).to(device)
            sample(lcm, f"{run}/{sub} LatentConsistencyModelPipeline", 6.0)
        del pipe

out = os.path.join(W, "lora_fp16")
if os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors")):
    pipe = StableDiffusionPipeline.from_pretrained(teacher, **kw).to(device)
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.load_lora_weights(out)
    a = sample(pipe, "lora_fp16 load_lora_weights", 1.0)
    pipe.fuse_lora()
    b = sample(pipe, "lora_fp16 fuse_lora", 1.0)
    diff = float(np.abs(a - b).max())
    print(f"lora: max |unfused - fused| = {diff:.4f}")
    if not diff < 0.1:
        failures.append("lora fused differs")
else:
    print("lora_fp16: no output to sample"); failures.append("lora_fp16")

if images:
    row = np.concatenate([np.kron(im, np.ones((8, 8, 1))) for im in images], axis=1)
    Image.fromarray((row * 255).round().astype(np.uint8)).save(os.path.join(os.environ["OUT"], "samples.png"))
    print(f"saved samples.png: {len(images)} images left to right in the order above")
assert not failures, failures
EOF
}

s_lora_memory() {
    if [ "$SMALL" = 1 ]; then
        python3 benchmarks/lora_memory.py --unet_channels 32,64 --layers_per_block 2 --cross_attention_dim 64 \
            --vae_channels 32,32,32,32 --resolution 64 --train_batch_size 2 --steps 2 --lora_rank 4
    else
        python3 benchmarks/lora_memory.py --sd15_shape --resolution 512 --train_batch_size 4 --steps 3 \
            --mixed_precision fp16
    fi
}
s_sdxl_memory() {  # LoRA, full and LoRA + second teacher copy at SDXL's shapes: peak memory and samples/s
    if [ "$SMALL" = 1 ]; then
        echo "sdxl_memory: needs CUDA (a 2.6 B-parameter UNet)"; return 0
    fi
    wait_for_big_teachers || return 1
    python3 benchmarks/lora_memory.py --teacher "$W/big_sdxl" --resolution 1024 --train_batch_size 1 --steps 6 \
        --mixed_precision fp16
}
s_sd35_memory() {  # LoRA (the teacher shares the student's transformer) and LoRA + a second teacher copy at SD3.5
    # Large's shapes (8.1 B parameters, no T5: add 9.5 GB for T5-XXL in bf16): peak memory and samples/s
    if [ "$SMALL" = 1 ]; then
        echo "sd35_memory: needs CUDA (an 8.1 B-parameter transformer)"; return 0
    fi
    wait_for_big_teachers || return 1
    python3 benchmarks/lora_memory.py --teacher "$W/big_sd35" --resolution 1024 --train_batch_size 1 --steps 4 \
        --mixed_precision bf16 --configs lora lora_second_teacher
}
# The SDXL- and SD3.5 Large-shaped random teachers (2.6 B and 8.1 B parameters) are built in the background while
# the GPU runs the throughput rows: initialised on the GPU (minutes on a CPU) and stored in half precision (the
# SDXL one in fp16: 5 GB, not 10; SD3.5 in bf16: 16 GB), as the disk also holds the benchmarks' runs.
build_big_teachers() {
    [ "$SMALL" = 1 ] && return 0
    [ "${GPU_CHECK_NO_SDXL:-0}" = 1 ] || ! selected sdxl_memory || python3 -c "
import os, sys, torch
sys.path.insert(0, os.path.join(os.environ['ROOT'], 'benchmarks'))
from lora_memory import build_sdxl_shaped_teacher
torch.set_default_device('cuda')
torch.set_default_dtype(torch.float16)
build_sdxl_shaped_teacher(os.path.join(os.environ['W'], 'big_sdxl'))
" || return 1
    [ "${GPU_CHECK_NO_SD35:-0}" = 1 ] || ! selected sd35_memory || python3 -c "
import os, sys, torch
sys.path.insert(0, os.path.join(os.environ['ROOT'], 'benchmarks'))
from lora_memory import build_sd3_shaped_teacher
torch.set_default_device('cuda')
build_sd3_shaped_teacher(os.path.join(os.environ['W'], 'big_sd35'))
"
}
wait_for_big_teachers() {
    while [ ! -e "$W/big_teachers.rc" ]; do sleep 2; done
    cat "$W/big_teachers.log"
    [ "$(cat "$W/big_teachers.rc")" = 0 ] || { echo "building the big teachers failed"; return 1; }
}

s_batching() {
    if [ "$SMALL" = 1 ]; then
        python3 benchmarks/teacher_batching.py --unet_channels 32,64 --layers_per_block 2 --cross_attention_dim 64 \
            --vae_channels 32,32,32,32 --resolution 64 --batch_size 2 1 --steps 2 --repeats 1 --dtype bf16
    else
        python3 benchmarks/teacher_batching.py --sd15_shape --resolution 512 --batch_size 8 2 --steps 5 --repeats 3 \
            --dtype fp16
    fi 2>&1 | tee "$W/batching.log"
}
# The step with PyTorch's sync debug mode "error": the host must not wait for the GPU inside a step (only at the
# looks every --logging_steps, checkpoints and validation), from a precomputed shard set, full and LoRA.
s_sync() {
    rm -rf "$W/sync_latents" "$W/sync_full" "$W/sync_lora"
    [ "$HAS_CUDA" = 1 ] || { echo "no CUDA: nothing to watch"; return 0; }
    python3 -m lcm_utils.precompute --pretrained_teacher_model "$W/teacher" \
        --train_shards_path_or_url "$W/shards/{00000..00003}.tar" --resolution 16 --output_dir "$W/sync_latents" \
        --mixed_precision fp16 || return 1
    local flags=(--pretrained_teacher_model "$W/teacher" --resolution 16 --train_batch_size 4 --max_train_steps 12
                 --train_shards_path_or_url "$W/sync_latents/latents-{000000..000003}.tar" --logging_steps 5
                 --checkpointing_steps 6 --validation_steps 12 --validation_inference_steps 1 2
                 --validation_prompts "a red square" --mixed_precision fp16 --report_to none --dataloader_num_workers 2)
    python3 scripts/sync_check.py train_lcm_distill.py "${flags[@]}" --output_dir "$W/sync_full" || return 1
    python3 scripts/sync_check.py train_lcm_lora.py "${flags[@]}" --output_dir "$W/sync_lora" --lora_rank 4
}

# Throughput against the step's irreducible UNet passes at SD 1.5's shapes (512 px, fp16, batch 8): images on
# the fly, precomputed shards, compiled, and a host-device wait every step.
s_throughput() {
    if [ "$SMALL" = 1 ]; then
        python3 benchmarks/throughput.py --unet_channels 32,64 --layers_per_block 1 --cross_attention_dim 64 \
            --vae_channels 32,32,32,32 --resolution 64 --train_batch_size 2 --steps 5 --warmup 2 --repeats 1 \
            --rows on_the_fly precomputed precomputed_log_every_step --json "$OUT/throughput.json"
    else
        python3 benchmarks/throughput.py --sd15_shape --resolution 512 --train_batch_size 8 --mixed_precision fp16 \
            --steps 12 --warmup 4 --repeats 3 --dataloader_num_workers 4 --json "$OUT/throughput.json" \
            --rows on_the_fly precomputed precomputed_channels_last precomputed_torch_compile precomputed_teacher_fp32 \
                precomputed_log_every_step
    fi 2>&1 | tee "$W/throughput.log"
}
export -f selected step launch tiny_flags train_and_resume s_fsdp s_deepspeed s_wheels s_versions s_assets s_full_fp16 s_full_bf16 s_lora_fp16 \
    s_losses s_sample s_lora_memory s_sdxl_memory s_sd35_memory build_big_teachers wait_for_big_teachers s_batching s_sdxl_fp16 s_sd3_bf16 s_sync s_throughput

lane() {  # lane NAME STEP...: run "name:limit:function" steps in order into $W/lane_NAME.{log,result}
    local lane_name=$1
    shift
    ( RESULTS=()
      for spec in "$@"; do
          IFS=: read -r name limit fn <<< "$spec"
          step "$name" "$limit" "$fn"
      done > "$W/lane_$lane_name.log" 2>&1
      printf '%s\n' "${RESULTS[@]}" > "$W/lane_$lane_name.result" )
}

main() {
    RESULTS=()
    echo "gpu_check start $(date -u +%FT%TZ) in $ROOT, work folder $W"
    rm -rf "$W" && mkdir -p "$W"
    if [ -d .whl ] && [ "${GPU_CHECK_NO_WHEELS:-0}" != 1 ]; then
        step wheels 60 s_wheels
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "=== wheels: skipped (no .whl/ or GPU_CHECK_NO_WHEELS=1)"
    fi
    step versions 45 s_versions
    HAS_CUDA=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
    SMALL=${GPU_CHECK_SMALL:-0}
    [ "$HAS_CUDA" = 1 ] || SMALL=1
    export HAS_CUDA SMALL
    echo "HAS_CUDA=$HAS_CUDA SMALL=$SMALL$([ "$HAS_CUDA" = 1 ] || echo ' (no CUDA: mixed-precision runs use --mixed_precision no)')"

    ( build_big_teachers > "$W/big_teachers.log" 2>&1; echo $? > "$W/big_teachers.rc" ) &
    # The GPU benchmarks run alone first. The memory benchmark measures per-process peaks (CUDA peak allocation),
    # so it then runs beside the training checks, which run in five lanes at once (tiny models: their time is
    # process start-up, not the GPU). The FSDP and DeepSpeed lanes open process groups, each on its own port.
    step teacher_batching 90 s_batching
    step throughput 360 s_throughput
    local memory=(lora_memory:180:s_lora_memory)
    [ "${GPU_CHECK_NO_SDXL:-0}" = 1 ] || memory+=(sdxl_memory:420:s_sdxl_memory)
    [ "${GPU_CHECK_NO_SD35:-0}" = 1 ] || memory+=(sd35_memory:480:s_sd35_memory)
    lane memory "${memory[@]}" &

    step assets 45 s_assets
    lane sd full_fp16_train+resume:100:s_full_fp16 full_bf16_train+resume:100:s_full_bf16 \
        lora_fp16_train:60:s_lora_fp16 losses_finite:30:s_losses sample_stock_pipelines:60:s_sample &
    lane sdxl sdxl_fp16_train+sample:200:s_sdxl_fp16 sync_free_step:150:s_sync &
    lane sd3 sd3_bf16_train+sample:200:s_sd3_bf16 &
    GPU_CHECK_PORT=29511 lane fsdp fsdp_train+resume+sample:240:s_fsdp &
    GPU_CHECK_PORT=29522 lane deepspeed deepspeed_train+resume+sample:360:s_deepspeed &
    wait
    for name in sd sdxl sd3 fsdp deepspeed memory; do
        echo
        echo "=== lane $name"
        cat "$W/lane_$name.log"
        mapfile -t -O "${#RESULTS[@]}" RESULTS < "$W/lane_$name.result" 2>/dev/null \
            || RESULTS+=("FAIL lane $name (no result)")
    done
    for pair in full_fp16:25 full_bf16:25 lora_fp16:20; do
        local src=$W/${pair%%:*}/validation/step-0000${pair##*:}.png
        [ -f "$src" ] && cp "$src" "$OUT/val_${pair%%:*}.png"
    done
    # At most eight files come back from some machines: the images travel as one archive.
    (cd "$OUT" && ls ./*.png > /dev/null 2>&1 && tar cf images.tar ./*.png && rm -f ./*.png)

    echo
    echo "=== figures"
    grep -A4 "^UNet parameters" "$W/lane_memory.log" || echo "(no lora_memory tables)"
    grep -A3 "^device " "$W/batching.log" 2>/dev/null || echo "(no teacher_batching figures)"
    grep -A9 " script; UNet" "$W/throughput.log" 2>/dev/null || echo "(no throughput table)"
    echo "=== summary (total ${SECONDS}s, HAS_CUDA=$HAS_CUDA, SMALL=$SMALL)"
    printf '%s\n' "${RESULTS[@]}"
    ls -la "$OUT"
    ! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
}

main 2>&1 | tee "$OUT/gpu_check.log"
