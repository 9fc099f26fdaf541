"""The end of a run: the final weights, the scheduler to sample them with, the model card, the Hub upload.

What is written depends on the method (full UNet or LoRA file), the family (pipeline, tags) and the objective
(scheduler, sampling arguments, card text); this module only asks them.
"""

import glob
import os

import yaml

from .. import checkpoint as ckpt
from ..config import HUB_ID
from .validation import last_validation_metrics

EXPORT_STATE = "exported.json"  # which run and step the exported weights in output_dir come from


def sampling_scheduler(teacher, objective, args):
    """The scheduler a user should sample this run's student with: the objective's, on the teacher's schedule
    with this run's settings (LCM: its timestep scaling and DDIM grid)."""
    kind = teacher.family.schedule_kind
    overrides = objective.scheduler_overrides(args.timestep_scaling_factor, args.num_ddim_timesteps, kind,
                                              teacher.noise_scheduler.config.get("shift"))
    return teacher.scheduler(objective.scheduler_class(kind), **overrides)


def stock_pipeline(teacher, denoiser, objective, args):
    """The teacher family's stock pipeline from the loaded teacher parts, the given denoiser and this run's sampling
    scheduler."""
    return teacher.pipeline(denoiser, sampling_scheduler(teacher, objective, args))


def sampler_usage(objective, family):
    """(scheduler class, extra call arguments as text, a good step count) for the model card's snippet."""
    kind = family.schedule_kind
    extra = "".join(f", {name}={value:g}" for name, value in objective.sampling_kwargs(kind).items())
    return objective.scheduler_class(kind), extra, objective.sampling_steps


def pretrained_parts(args, family):
    """from_pretrained arguments of the model card's snippet: the teacher, the parts its folder lacks (SD3 without
    T5), and the VAE the run used if not its own."""
    parts = f'"{args.pretrained_teacher_model}"' + "".join(
        f", {name}={value}" for name, value in
        family.pipeline_loading_extras(args.pretrained_teacher_model, args.without_t5).items())
    if args.pretrained_vae_model_name_or_path:
        parts += f', vae=AutoencoderKL.from_pretrained("{args.pretrained_vae_model_name_or_path}")'
    return parts


def vae_import(args):
    return "AutoencoderKL, " if args.pretrained_vae_model_name_or_path else ""


def finish(run, teacher, step):
    """Export the weights of `step` (scheduler, weights, model card, then exported.json), unless output_dir already
    holds this run's export of this step or a later one: a rerun past the end leaves the export untouched, and
    older weights never replace newer ones. A new run (no resume) in the same folder exports its own. With
    --push_to_hub the upload is recorded too, so a rerun retries one that failed."""
    acc, args, method = run.accelerator, run.args, run.method
    acc.wait_for_everyone()
    weights = method.snapshot()
    if acc.is_main_process:
        record = os.path.join(args.output_dir, EXPORT_STATE)
        previous = read_export_state(args.output_dir)
        if previous.get("run_id") == run.run_id and previous.get("step", -1) >= step:
            run.log(f"{args.output_dir} already holds this run's export of step {previous['step']}; left as it is "
                    f"(delete {EXPORT_STATE} there to export step {step} again)")
            state = previous
        else:
            sampling_scheduler(teacher, method.objective, args).save_pretrained(os.path.join(args.output_dir,
                                                                                             "scheduler"))
            usage = method.export(args.output_dir, weights)
            write_model_card(args, usage, step, method, teacher.family, method.objective)
            # Written last: an export cut short by a kill has no record, and the next run writes it again.
            state = {"step": step, "run_id": run.run_id, "uploaded": False}
            ckpt.write_json(record, state)
            run.log(f"saved the distilled model (step {step}) to {args.output_dir}")
        if run.repo_id and not state.get("uploaded"):
            from huggingface_hub import upload_folder

            upload_folder(repo_id=run.repo_id, folder_path=args.output_dir, token=args.hub_token,
                          ignore_patterns=["checkpoint-*", "*.partial", "logs/*"])
            ckpt.write_json(record, dict(state, uploaded=True))
    acc.end_training()


def read_export_state(output_dir):
    path = os.path.join(output_dir, EXPORT_STATE)
    try:
        return ckpt.read_json(path)
    except (OSError, ValueError):
        return {}


def validation_section(output_dir):
    """The model card's picture of the newest validation grid and a table of its distances to the teacher."""
    grids = sorted(glob.glob(os.path.join(output_dir, "validation", "step-*.png")))
    section = (f"\n![validation grid at step {int(os.path.basename(grids[-1])[5:-4])}: one row per prompt, one "
               f"column per LCM step count](validation/{os.path.basename(grids[-1])})\n") if grids else ""
    metrics = last_validation_metrics(output_dir)
    if metrics:
        distances = metrics["teacher_rmse"]
        header, values = " | ".join(distances), " | ".join(f"{v:.4f}" for v in distances.values())
        section += (f"\nAt the last validation (step {metrics['step']}, guidance_scale {metrics['guidance_scale']:g}), "
                    f"the latent RMS distance of each sample to the {metrics['reference']} sample of the same prompt "
                    f"and noise, averaged over the validation prompts (lower is closer to the teacher):\n\n"
                    f"| LCM steps | {header} |\n| --- |{' ---: |' * len(distances)}\n| distance | {values} |\n")
    return section


def write_model_card(args, usage, step, method, family, objective):
    """README.md with the Hub's model-card metadata (library, base model, tags, pipeline), the usage, and the
    newest validation grid."""
    tags = (["lcm", "latent-consistency-distillation"] + objective.tags() + ["text-to-image"]
            + list(family.card_tags) + list(method.card_tags))
    metadata = {"library_name": "diffusers", "tags": tags, "pipeline_tag": "text-to-image", "inference": True}
    if HUB_ID.match(args.pretrained_teacher_model) and not os.path.isdir(args.pretrained_teacher_model):
        metadata["base_model"] = args.pretrained_teacher_model  # the Hub wants an id here, never a local path
    adversarial = (f", plus an adversarial term of weight {args.adv_weight:g} with the teacher as discriminator "
                   f"backbone" if args.adv_weight > 0 else "")
    text = f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {objective.name.upper()}{method.card_kind} {family.name} model

Distilled from `{args.pretrained_teacher_model}` by {objective.title} for {step} steps
(w ~ U[{args.w_min}, {args.w_max}], N = {args.num_ddim_timesteps} DDIM steps, {args.loss_type} loss{adversarial}).
{validation_section(args.output_dir)}
{usage}

{objective.sampling_note(family.schedule_kind)}

The resolved training configuration is in `training_config.yaml`.
"""
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write(text)
