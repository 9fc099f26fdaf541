#!/usr/bin/env python
"""Sample a distilled model (full or LoRA, SD or SDXL; LCM, TCD or PCM) with a stock diffusers pipeline and its
exported scheduler, as a labelled grid: one row per prompt, one column per (steps, guidance_scale).

    python scripts/sample.py --model lcm-sd15 --prompt "a photo of a cat" --steps 1 2 4 8
    python scripts/sample.py --model lcm-lora-sdxl --steps 4 --guidance_scale 1.0 1.5 --out grid.png

The teacher (and a VAE the run used instead of its own) come from the output's training_config.yaml unless
--teacher / --vae say otherwise. A full student takes the guidance as input (guidance_scale = w + 1, no CFG pass);
a LoRA is applied with load_lora_weights and samples with real CFG only when guidance_scale > 1. A TCD student
samples with the run's --tcd_gamma as eta (--eta overrides it), a PCM student with eta 0.
"""

import argparse
import os
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lcm_utils.evaluation import (decode_to_array, exported_scheduler, labelled_grid,  # noqa: E402
                                  output_sampling_kwargs)
from lcm_utils.families import family_at  # noqa: E402


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_pipeline(args, trained):
    """The teacher family's stock pipeline with the student and its exported scheduler (LCMScheduler or
    TCDScheduler); `trained`: the output's training_config.yaml ({} when it has none)."""
    from diffusers import AutoencoderKL

    teacher = args.teacher or trained.get("pretrained_teacher_model")
    if not teacher:
        fail(f"--teacher: '{args.model}' has no training_config.yaml naming its teacher; pass --teacher")
    family = family_at(teacher)
    folder, lora_file = family.denoiser_folder, family.lora_weights_file
    is_full = os.path.isdir(os.path.join(args.model, folder))
    if not is_full and not os.path.isfile(os.path.join(args.model, lora_file)):
        fail(f"--model: '{args.model}' holds neither {folder}/ (full distillation) nor {lora_file} (LCM-LoRA)")
    parts = {"scheduler": exported_scheduler(args.model)}  # LCMScheduler or TCDScheduler
    if is_full:
        parts[folder] = family.denoiser_class().from_pretrained(args.model, subfolder=folder)
    vae = args.vae or trained.get("pretrained_vae_model_name_or_path")
    if vae:
        parts["vae"] = AutoencoderKL.from_pretrained(vae)
    pipe = family.load_pipeline(teacher, **parts)
    if not is_full:
        pipe.load_lora_weights(args.model)
    return pipe.to(args.device), is_full, family


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="A training output_dir (full or LoRA).")
    parser.add_argument("--teacher", default=None, help="Default: the teacher in training_config.yaml.")
    parser.add_argument("--vae", default=None, help="Default: the VAE in training_config.yaml, if the run had one.")
    parser.add_argument("--prompt", nargs="+", default=["a photo of a cat"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="LCM step counts (columns).")
    parser.add_argument("--guidance_scale", type=float, nargs="+", default=None,
                        help="guidance_scale values (columns); default: w_min + 1 for a full student, 1.0 for LoRA.")
    parser.add_argument("--resolution", type=int, default=None, help="Default: the training resolution.")
    parser.add_argument("--seed", type=int, default=0, help="Row i samples from seed + i in every column.")
    parser.add_argument("--eta", type=float, default=None,
                        help="TCDScheduler's gamma (default: the run's --tcd_gamma for TCD, 0 for PCM).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="samples.png")
    args = parser.parse_args()
    if not os.path.isdir(args.model):
        fail(f"--model: folder '{args.model}' does not exist")

    config_path = os.path.join(args.model, "training_config.yaml")
    trained = yaml.safe_load(open(config_path)) if os.path.isfile(config_path) else {}
    pipe, is_full, family = load_pipeline(args, trained)
    guidances = args.guidance_scale or [trained.get("w_min", 7.5) + 1 if is_full else 1.0]
    denoiser_config = pipe.components[family.denoiser_folder].config
    size = args.resolution or trained.get("resolution") or denoiser_config.sample_size * pipe.vae_scale_factor
    sampler = output_sampling_kwargs(args.model)
    if args.eta is not None:
        sampler = {"eta": args.eta}
    columns = [(steps, g) for g in guidances for steps in args.steps]
    rows = []
    for i, prompt in enumerate(args.prompt):
        row = []
        for steps, guidance in columns:
            latents = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                           generator=torch.Generator().manual_seed(args.seed + i), output_type="latent",
                           **sampler).images
            row.append((decode_to_array(pipe, latents)[0] * 255).round().astype("uint8"))
        rows.append(row)
    labels = [f"{steps} step{'s' if steps > 1 else ''}, g {g:g}" for steps, g in columns]
    labelled_grid(rows, args.prompt, labels).save(args.out)
    print(f"saved {args.out}: {len(args.prompt)} prompt(s) x {len(columns)} (steps, guidance_scale) column(s), "
          f"{'full student' if is_full else 'LoRA'} on {type(pipe).__name__}")


if __name__ == "__main__":
    main()
