#!/usr/bin/env python
"""Sample a distilled model (full or LoRA, SD or SDXL; LCM, TCD or PCM) with a stock diffusers pipeline and its
exported scheduler, as a labelled grid: one row per prompt, one column per (steps, guidance_scale).

    python scripts/sample.py --model lcm-sd15 --prompt "a photo of a cat" --steps 1 2 4 8
    python scripts/sample.py --model lcm-lora-sdxl --steps 4 --guidance_scale 1.0 1.5 --out grid.png

The teacher (and a VAE the run used instead of its own) come from the output's training_config.yaml unless
--teacher / --vae say otherwise. A full student takes the guidance as input (guidance_scale = w + 1, no CFG pass);
a LoRA is applied with load_lora_weights and samples with real CFG only when guidance_scale > 1. The steps default
to 1 2 4 8, and to its phase count for a PCM student. A TCD student samples with the run's --tcd_gamma as eta
(--eta overrides it), a PCM student with eta 0; the column labels show the eta.
"""

import argparse
import json
import os
import re
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # as lcm_utils.config.checks, which would import torch first


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line as the training scripts say it, not the usage too
        fail(f"{message} (see --help)")


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="A training output_dir (full or LoRA).")
    parser.add_argument("--teacher", help="Default: the teacher in training_config.yaml.")
    parser.add_argument("--vae", help="Default: the VAE in training_config.yaml, if the run had one.")
    parser.add_argument("--prompt", nargs="+", default=["a photo of a cat"])
    parser.add_argument("--steps", type=int, nargs="+", help="Step counts (columns); default: 1 2 4 8, PCM's phases.")
    parser.add_argument("--guidance_scale", type=float, nargs="+",
                        help="guidance_scale values (columns); default: w_min + 1 for a full student with a w input, "
                             "1.0 for LoRA and SD3.")
    parser.add_argument("--resolution", type=int, help="Default: the training resolution.")
    parser.add_argument("--seed", type=int, default=0, help="Row i samples from seed + i in every column.")
    parser.add_argument("--eta", type=float, help="TCDScheduler's gamma (default: --tcd_gamma for TCD, 0 for PCM).")
    parser.add_argument("--device", help="Default: cuda when there is one, else cpu.")
    parser.add_argument("--out", default="samples.png", help="The grid image (default: samples.png).")
    parser.add_argument("--verbose", action="store_true", help="Show library messages and progress bars.")
    return parser.parse_args(argv)


def check_model(path, flag, what, files, origin="", verbose=False):
    """Fail, before torch loads, unless `path` is a folder with `files` or a Hub id whose `files` download; an entry
    of `files` may be a tuple of alternatives (unet/ or transformer/)."""
    files = [entry if isinstance(entry, tuple) else (entry,) for entry in files]
    if os.path.isdir(path):
        for names in files:
            if not any(os.path.isfile(os.path.join(path, name)) for name in names):
                fail(f"{flag}: '{path}'{origin} has no {' or '.join(names)}; pass a diffusers-format {what} folder")
        return
    if path.startswith(("/", ".", "~")) or not HUB_ID.match(path) or os.path.isdir(path.split("/")[0]):
        fail(f"{flag}: folder '{path}'{origin} does not exist; pass a diffusers-format {what} folder or a Hub id")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError, logging

    if not verbose:
        logging.set_verbosity_error()  # its "Retrying in 4s" lines while there is no network
    try:
        for names in files:  # cached for the pipeline
            for i, name in enumerate(names):
                try:
                    hf_hub_download(path, name)
                    break
                except LocalEntryNotFoundError:
                    raise
                except (OSError, ValueError):
                    if i == len(names) - 1:
                        raise
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if isinstance(e, LocalEntryNotFoundError):  # not cached, and no way to the Hub
            reason = f"not cached, and {'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'no network'}"
        fail(f"{flag}: '{path}'{origin} is not a folder here and could not be fetched from the Hub ({reason}); "
             f"pass a local {what} folder, or check the id and the network")


def check_cheaply(args):
    """The checks that read a few small files only; returns (training config, scheduler config, teacher)."""
    from PIL import Image

    if not os.path.isdir(args.model):
        fail(f"--model: folder '{args.model}' does not exist; pass the output_dir of a training run")
    scheduler_path = os.path.join(args.model, "scheduler", "scheduler_config.json")
    if not os.path.isfile(scheduler_path):
        fail(f"--model: '{args.model}' has no scheduler/scheduler_config.json, so it is not a finished training "
             f"output; pass the output_dir of a run that completed")
    scheduler = json.load(open(scheduler_path))
    config_path = os.path.join(args.model, "training_config.yaml")
    trained = (yaml.safe_load(open(config_path)) or {}) if os.path.isfile(config_path) else {}
    most = scheduler.get("original_inference_steps", 50)  # the scheduler picks its steps out of this grid
    if args.steps and not all(1 <= n <= most for n in args.steps):
        fail(f"--steps: each step count must be in 1..{most} (this model's original_inference_steps), got "
             f"{' '.join(map(str, args.steps))}")
    takes_eta = scheduler["_class_name"] == "TCDScheduler"  # the pipelines drop eta for LCMScheduler, unsaid
    if args.eta is not None and not (takes_eta and 0 <= args.eta <= 1):
        fail(f"--eta: TCDScheduler's gamma must be in [0, 1], got {args.eta:g}" if takes_eta
             else f"--eta: this model samples with {scheduler['_class_name']}, which takes no eta; drop --eta")
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        fail(f"--out: '{args.out}' is not an image file name; pass one ending in .png or .jpg")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        fail(f"--out: cannot write into '{folder}' (missing or read-only); create it or pass another path")
    teacher = args.teacher or trained.get("pretrained_teacher_model")
    if not teacher:
        fail(f"--teacher: '{args.model}' has no training_config.yaml naming its teacher; pass --teacher")
    origin = "" if args.teacher else f" (the teacher in {config_path}; --teacher overrides it)"
    # Last: a Hub id's files are fetched here, which takes a while without network.
    denoisers = ("unet/config.json", "transformer/config.json")
    check_model(teacher, "--teacher", "teacher", ("model_index.json", denoisers), origin, args.verbose)
    args.vae = args.vae or trained.get("pretrained_vae_model_name_or_path")
    if args.vae:
        check_model(args.vae, "--vae", "AutoencoderKL", ("config.json",), verbose=args.verbose)
    return trained, scheduler, teacher


def family_of_teacher(teacher):
    """The teacher's family class, its folder's parts checked; or one error line."""
    from lcm_utils.errors import ConfigError
    from lcm_utils.families.registry import denoiser_config, family_of

    config = denoiser_config(teacher)
    try:
        family = family_of(config, flag="--teacher")
        if os.path.isdir(teacher):
            family.check_folder(teacher, config, "--teacher")
    except ConfigError as e:
        fail(str(e))
    return family


def load_pipeline(args, family, teacher):
    """The teacher family's stock pipeline with the student and its exported scheduler; (pipe, is_full)."""
    from diffusers import AutoencoderKL

    from lcm_utils.evaluation import exported_scheduler

    folder, lora_file = family.denoiser_folder, family.lora_weights_file
    is_full = os.path.isdir(os.path.join(args.model, folder))
    if not is_full and not os.path.isfile(os.path.join(args.model, lora_file)):
        fail(f"--model: '{args.model}' holds neither {folder}/ (full distillation) nor {lora_file} (LCM-LoRA)")
    parts = {"scheduler": exported_scheduler(args.model)}
    if is_full:
        parts[folder] = family.denoiser_class().from_pretrained(args.model, subfolder=folder)
    if args.vae:
        parts["vae"] = AutoencoderKL.from_pretrained(args.vae)
    pipe = family.load_pipeline(teacher, bool(args.trained.get("without_t5")), **parts)
    if not is_full:
        pipe.load_lora_weights(args.model)
    pipe.set_progress_bar_config(disable=not args.verbose)
    return pipe.to(args.device), is_full


def main(argv=None):
    args = parse_args(argv)
    trained, scheduler, teacher = check_cheaply(args)
    args.trained = trained
    if not args.verbose:  # before diffusers and transformers load, so their import-time notes stay out too
        from lcm_utils.console import quiet_libraries

        quiet_libraries()
    import torch

    from lcm_utils.evaluation import decode_to_array, labelled_grid, scheduler_at
    from lcm_utils.objectives import make_objective

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device: torch sees no CUDA device here; pass --device cpu")
    family = family_of_teacher(teacher)
    pipe, is_full = load_pipeline(args, family, teacher)

    objective = make_objective(trained.get("objective", "lcm"), trained.get("num_phases", 4),
                               trained.get("tcd_gamma", 0.3))
    # A PCM student learnt to jump from phase edge to phase edge: its phase count is the one it samples well at.
    steps = args.steps or ([objective.sampling_steps] if objective.name == "pcm" else [1, 2, 4, 8])
    sampler = {**objective.sampling_kwargs(family.schedule_kind), **({} if args.eta is None else {"eta": args.eta})}
    if scheduler["_class_name"] == "TCDScheduler":
        sampler.setdefault("eta", 0.0)  # what the pipelines pass when not told; the labels say it
    takes_w = is_full and family.guidance_embedding_dim(pipe.components[family.denoiser_folder]) is not None
    guidances = args.guidance_scale or [trained.get("w_min", 7.5) + 1 if takes_w else 1.0]
    denoiser_config = pipe.components[family.denoiser_folder].config
    size = args.resolution or trained.get("resolution") or denoiser_config.sample_size * pipe.vae_scale_factor
    columns = [(n, g) for g in guidances for n in steps]
    exported = pipe.scheduler

    @torch.no_grad()
    def draw(prompt, seed, n, guidance):
        pipe.scheduler = scheduler_at(exported, n)
        latents = pipe(prompt, num_inference_steps=n, guidance_scale=guidance, height=size, width=size,
                       generator=torch.Generator().manual_seed(seed), output_type="latent", **sampler).images
        return (decode_to_array(pipe, latents)[0] * 255).round().astype("uint8")

    rows = [[draw(prompt, args.seed + i, n, g) for n, g in columns] for i, prompt in enumerate(args.prompt)]
    eta = f", eta {sampler['eta']:g}" if "eta" in sampler else ""
    labels = [f"{n} step{'s' if n > 1 else ''}, g {g:g}{eta}" for n, g in columns]
    labelled_grid(rows, args.prompt, labels).save(args.out)
    print(f"saved {args.out}: {len(args.prompt)} prompt(s) x {len(columns)} (steps, guidance_scale) column(s), "
          f"{'full student' if is_full else 'LoRA'} on {type(pipe).__name__}; {objective.name} with "
          f"{scheduler['_class_name']}, steps {steps}, guidance_scale {guidances}{eta}")


if __name__ == "__main__":
    main()
