#!/usr/bin/env bash
# Multi-node LCM distillation on SLURM: one accelerate launcher per node, requeued on preemption or at the time
# limit, resumed from the latest checkpoint. Submit with:  sbatch scripts/slurm_multinode.sh [script] [flags...]
#   sbatch --nodes 4 scripts/slurm_multinode.sh train_lcm_distill.py --config configs/sdxl_lcm.yaml \
#       --train_shards_path_or_url "/data/laion/{00000..01099}.tar" --output_dir /shared/lcm-sdxl
# SLURM sends SIGUSR1 120 s before the time limit (--signal below); a preemption sends SIGTERM to every process
# (unless the cluster sets PreemptParameters=send_user_signal). Either way the workers finish their step, write a
# checkpoint and stop, and this script requeues the job, which resumes from `latest`. Precision, batch and the
# rest come from the training flags (the presets set --mixed_precision).
#SBATCH --job-name=lcm-distill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=lcm-%x-%j.log
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export SCRIPT=${1:-train_lcm_distill.py}
shift || true
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER PORT=${MASTER_PORT:-29500}

# torchrun (under accelerate launch) passes SIGUSR1 on to the workers only when told to (PET_ is its own
# variable; TORCHELASTIC_ the one older releases read), and gives them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# (30 by default) before it kills them: time for the checkpoint.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
# SIGUSR1 reaches only this batch shell (B: above); scancel without --full passes it to the srun step. A
# preemption's SIGTERM reaches every process itself: only remember it.
stop_requested=0
trap 'stop_requested=1; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
trap 'stop_requested=1' TERM

# srun does not pass --cpus-per-task on to the step since SLURM 22.05: give it explicitly.
srun --kill-on-bad-exit=0 --cpus-per-task="$SLURM_CPUS_PER_TASK" bash -c '
  accelerate launch --multi_gpu --num_machines "$SLURM_NNODES" --num_processes $((GPUS_PER_NODE * SLURM_NNODES)) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER" --main_process_port "$PORT" \
    --rdzv_backend static --same_network --mixed_precision no --dynamo_backend no \
    "$SCRIPT" "$@" --resume_from_checkpoint latest' _ "$@" &
child=$!
wait "$child"; status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done  # a trapped signal ends `wait` early

if [ "$stop_requested" = 1 ]; then  # (accelerate reports any stop as status 1, so the trap is what tells)
  echo "stopped with a checkpoint (status $status): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
