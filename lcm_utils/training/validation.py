"""Validation during training: the student in a stock pipeline at each step count from fixed seeds, one labelled
grid per validation (PNG and trackers), and each sample's latent distance to the teacher's own sample."""

import json
import os
import sys
import tempfile

import numpy as np
import torch

from ..evaluation import decode_to_array, labelled_grid, scheduler_at
from ..families import load_teacher_denoiser

DEFAULT_VALIDATION_PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "a watercolor painting of a lighthouse at sunset",
    "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table",
]
REFERENCE_STEPS = 50  # the teacher's own sampler (DDIM, Euler) that validation compares the student's samples with
METRICS_FILE = "metrics.jsonl"  # under output_dir/validation: one line per validation


def autocast_for(run):
    """torch's own autocast in the run's low precision: accelerate's does nothing under DeepSpeed, and a pipeline's
    text encoders (low precision) and fresh UNet (fp32) must still meet."""
    return torch.autocast(run.accelerator.device.type, dtype=run.weight_dtype,
                          enabled=run.weight_dtype != torch.float32)


@torch.no_grad()
def teacher_references(run, teacher, prompts, guidance):
    """The teacher's own samples [1, C, h, w] of the validation prompts from the grid's seeds: its own sampler (DDIM,
    Euler on a flow schedule) with REFERENCE_STEPS steps and CFG at `guidance`, on a fresh copy of its denoiser (the
    one in training may be cast or carry adapters). Computed once per run: the teacher is frozen."""
    args, device = run.args, run.accelerator.device
    denoiser = load_teacher_denoiser(args, type(teacher.family))
    pipe = teacher.pipeline(denoiser.to(device).eval(),
                            teacher.scheduler(teacher.family.reference_scheduler_class_name))
    references = []
    for i, prompt in enumerate(prompts):
        with autocast_for(run):
            references.append(pipe(prompt, num_inference_steps=REFERENCE_STEPS, guidance_scale=guidance,
                                   height=args.resolution, width=args.resolution, output_type="latent",
                                   generator=torch.Generator(device="cpu").manual_seed(args.seed + i)).images.float())
    return references


@torch.no_grad()
def run_validation(run, teacher, step):
    """Sample the validation prompts at each LCM step count from fixed seeds; save and log one PNG grid, and the
    latent RMS distance of each sample to the teacher's own sample of the same prompt and noise (per step count,
    the mean over prompts: how close the few-step student lands to where the teacher's sampler ends)."""
    acc, args = run.accelerator, run.args
    weights = run.method.snapshot(student_only=True)
    if acc.is_main_process:
        prompts = args.validation_prompts or DEFAULT_VALIDATION_PROMPTS
        guidance = args.validation_guidance_scale
        if guidance is None:
            guidance = run.method.default_validation_guidance(args)
        distances = {n: [] for n in args.validation_inference_steps}
        sampler = run.method.objective.sampling_kwargs(teacher.family.schedule_kind)
        with tempfile.TemporaryDirectory(dir=args.output_dir, prefix=".validation-") as tmp, \
                teacher.encoders_on(acc.device):
            if run.references is None:
                run.references = teacher_references(run, teacher, prompts, run.method.reference_guidance(args))
            pipe = run.method.validation_pipeline(tmp, teacher, args, acc.device, weights)
            scheduler = pipe.scheduler
            del weights
            rows, columns = [], [f"{n} step{'s' if n > 1 else ''}, g {guidance:g}"
                                 for n in args.validation_inference_steps]
            for i, prompt in enumerate(prompts):
                row = []
                for steps in args.validation_inference_steps:
                    gen = torch.Generator(device="cpu").manual_seed(args.seed + i)
                    pipe.scheduler = scheduler_at(scheduler, steps)
                    with autocast_for(run):
                        latents = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                                       height=args.resolution, width=args.resolution, generator=gen,
                                       output_type="latent", **sampler).images
                    distances[steps].append((latents.float() - run.references[i]).square().mean().sqrt().item())
                    # Decoded outside autocast, in the VAE's own dtype: SDXL's VAE overflows in fp16.
                    row.append((decode_to_array(pipe, latents)[0] * 255).round().astype(np.uint8))
                rows.append(row)
            del pipe
        grid = np.asarray(labelled_grid(rows, prompts, columns))
        save_grid(grid, os.path.join(args.output_dir, "validation", f"step-{step:06d}.png"))
        log_grid(acc, grid, step)
        metrics = {n: float(np.mean(d)) for n, d in distances.items()}
        acc.log({f"validation/teacher_rmse_{n}_steps": value for n, value in metrics.items()}, step=step)
        record_validation_metrics(args.output_dir, step, metrics, guidance, run.method.reference_guidance(args),
                                  teacher.family.reference_sampler_name)
    acc.wait_for_everyone()


def record_validation_metrics(output_dir, step, metrics, guidance, reference_guidance, sampler="DDIM"):
    """Append this validation's metrics to validation/metrics.jsonl (the model card shows the last line)."""
    line = {"step": step, "guidance_scale": guidance, "reference": f"teacher {sampler} {REFERENCE_STEPS} steps, "
            f"guidance {reference_guidance:g}", "teacher_rmse": {str(n): v for n, v in metrics.items()}}
    with open(os.path.join(output_dir, "validation", METRICS_FILE), "a") as f:
        f.write(json.dumps(line) + "\n")


def last_validation_metrics(output_dir):
    """The last line of validation/metrics.jsonl, or None."""
    try:
        with open(os.path.join(output_dir, "validation", METRICS_FILE)) as f:
            lines = [line for line in f if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def save_grid(grid, path):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)


def log_grid(acc, grid, step):
    """The validation grid [H, W, 3] uint8 to every tracker that takes images. tensorboard and wandb are tested;
    the others follow accelerate's and their own APIs, and a failure there is a warning, not a stopped run."""
    for tracker in acc.trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", grid, step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": wandb.Image(grid)}, step=step)
            elif tracker.name == "aim":
                tracker.log_images({"validation": grid}, step=step)
            elif tracker.name in ("clearml", "swanlab"):
                tracker.log_images({"validation": [grid]}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_image(grid, f"validation/step-{step:06d}.png")
            elif tracker.name == "comet_ml":
                tracker.tracker.log_image(grid, name="validation", step=step)
        except Exception as e:  # an optional tracker's API drift must not end a long run
            print(f"warning: the validation grid was not logged to {tracker.name} ({type(e).__name__}: {e})",
                  file=sys.stderr)
