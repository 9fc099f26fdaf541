"""Validation of the flags before anything heavy loads: one ConfigError line naming the flag and the fix.

Everything here is cheap: it reads at most a few JSON config files of the teacher, never weights.
"""

import importlib.util
import os
import re

from .. import checkpoint as ckpt
from ..errors import ConfigError
from ..families import family_of, local_denoiser_folder, read_json, teacher_identity, vae_scale_factor
from ..fingerprints import weights_differ
from .flags import TRACKERS

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_local_model(path_or_id, flag):
    """Return the local folder for a path, None for a Hub id; raise for a path that does not exist."""
    if os.path.isdir(path_or_id):
        return path_or_id
    looks_local = path_or_id.startswith(("/", "./", "../", "~")) or os.sep + os.sep in path_or_id
    parent = path_or_id.split("/")[0]
    if looks_local or not HUB_ID.match(path_or_id) or os.path.isdir(parent):
        raise ConfigError(f"{flag}: folder '{path_or_id}' does not exist; pass a diffusers-format model folder "
                          f"or a Hub id like 'org/name'")
    return None


def check_teacher(args):
    """Check the teacher folder layout and family; returns (scheduler config, vae config) dicts when local."""
    local = resolve_local_model(args.pretrained_teacher_model, "--pretrained_teacher_model")
    if local is None:
        return None, None
    flag = "--pretrained_teacher_model"
    folder = local_denoiser_folder(local)
    if folder is None:
        raise ConfigError(f"{flag}: '{local}' has no unet/config.json or transformer/config.json; pass a "
                          f"diffusers-format Stable Diffusion folder")
    denoiser_cfg = read_json(local, folder, "config.json")
    family = family_of(denoiser_cfg, f"'{local}/{folder}/config.json'")
    family.check_folder(local, denoiser_cfg, flag)
    if args.without_t5 and family.text_folders(local, True) == family.text_folders(local):
        raise ConfigError(f"--without_t5: the teacher '{local}' ({family.name}) has no T5 to leave out; drop the flag")
    vae_cfg = read_json(local, "vae", "config.json")
    if args.pretrained_vae_model_name_or_path:
        vae_local = resolve_local_model(args.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path")
        vae_cfg = None
        if vae_local is not None:
            if not os.path.isfile(os.path.join(vae_local, "config.json")):
                raise ConfigError(f"--pretrained_vae_model_name_or_path: '{vae_local}' has no config.json; "
                                  f"pass a diffusers AutoencoderKL folder")
            vae_cfg = read_json(vae_local, "config.json")
    return read_json(local, "scheduler", "scheduler_config.json"), vae_cfg


def require_package(module, flag, package=None):
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{flag} needs the '{package or module}' package: pip install {package or module}")


def validate(args):
    """Check flag values and combinations before anything heavy loads; raise ConfigError (one line)."""
    if not args.pretrained_teacher_model:
        raise ConfigError("--pretrained_teacher_model is required: a diffusers-format folder or a Hub id")
    # The data flags (source, resolution, batch size, ...) are checked by data.check_data_spec.
    if args.encode_batch_size is not None:
        args.vae_encode_batch_size = args.encode_batch_size
    if args.teacher_unet_fp32:
        args.cast_teacher_unet = False
    positive = ("num_train_epochs", "gradient_accumulation_steps", "num_ddim_timesteps", "checkpointing_steps",
                "validation_steps", "vae_encode_batch_size", "max_nonfinite_steps", "logging_steps")
    for name in positive + ("max_train_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name} must be a positive integer, got {value}")
    if any(n <= 0 for n in args.validation_inference_steps):
        raise ConfigError("--validation_inference_steps must be positive integers")
    for name in ("learning_rate", "huber_c", "timestep_scaling_factor"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.lr_warmup_steps < 0 or args.max_grad_norm < 0:
        raise ConfigError("--lr_warmup_steps and --max_grad_norm must be >= 0")
    if args.w_min < 0 or args.w_min > args.w_max:
        raise ConfigError(f"--w_min ({args.w_min}) must be >= 0 and <= --w_max ({args.w_max})")
    if not 1 <= args.num_phases <= args.num_ddim_timesteps:
        raise ConfigError(f"--num_phases must be in 1..{args.num_ddim_timesteps} (--num_ddim_timesteps), "
                          f"got {args.num_phases}")
    if not 0.0 <= args.tcd_gamma <= 1.0:
        raise ConfigError(f"--tcd_gamma must be in [0, 1], got {args.tcd_gamma}")
    if not args.adv_weight >= 0.0:
        raise ConfigError(f"--adv_weight must be >= 0 (0 turns the adversarial term off), got {args.adv_weight}")
    if args.adv_weight > 0 and not args.adv_lr > 0.0:
        raise ConfigError(f"--adv_lr must be positive, got {args.adv_lr}")
    if args.adv_fake == "x0" and args.adv_real != "data":
        raise ConfigError("--adv_fake x0 needs --adv_real data (the consistency target has no clean estimate)")
    if args.max_train_steps is None and args.train_shards_path_or_url and args.max_train_samples is None:
        raise ConfigError("--max_train_steps is required with webdataset shards unless --max_train_samples "
                          "sets the epoch length")
    from ..safety import parse_stop_signals

    try:
        parse_stop_signals(args.stop_signals)
    except ValueError as e:
        raise ConfigError(f"--stop_signals: '{e}' is not a signal a process can catch; use a comma list such as "
                          f"SIGINT,SIGTERM,SIGUSR1 or 'none'") from None
    check_precision(args)
    if args.use_8bit_adam:
        require_package("bitsandbytes", "--use_8bit_adam")
    if args.enable_xformers_memory_efficient_attention:
        require_package("xformers", "--enable_xformers_memory_efficient_attention")
    if TRACKERS[args.report_to]:
        require_package(TRACKERS[args.report_to], f"--report_to {args.report_to}")
    if args.push_to_hub:
        if args.report_to in ("wandb", "all") and args.hub_token:
            raise ConfigError("--hub_token with --report_to wandb would expose the token in the logged config; "
                              "log in with `hf auth login` instead")
    validate_resume(args)
    scheduler_cfg, vae_cfg = check_teacher(args)
    absolute_local_paths(args)
    check_resume_teacher(args)
    if scheduler_cfg is not None:
        T = scheduler_cfg.get("num_train_timesteps", 1000)
        if args.num_ddim_timesteps > T or T % args.num_ddim_timesteps:
            raise ConfigError(f"--num_ddim_timesteps ({args.num_ddim_timesteps}) must divide the teacher's "
                              f"num_train_timesteps ({T}); try 50")
    if vae_cfg is not None:
        check_resolution(args, vae_cfg)


def absolute_local_paths(args):
    """Local model folders as absolute paths, so that training_config.yaml, the model card and scripts/sample.py
    find them from any folder; Hub ids stay ids."""
    for name in ("pretrained_teacher_model", "pretrained_vae_model_name_or_path"):
        value = getattr(args, name)
        if value and os.path.isdir(value):
            setattr(args, name, os.path.abspath(value))


def check_resolution(args, vae_cfg):
    """The training size must give whole latents (a multiple of the VAE factor; the UNet pads odd sizes itself), and
    the stock pipelines (validation, users) accept only multiples of 8: one rule, so that training never stops at
    its first validation."""
    import math

    vae_factor = vae_scale_factor(vae_cfg)
    need = math.lcm(8, vae_factor)
    if args.resolution % need:
        near = max(need, round(args.resolution / need) * need)
        raise ConfigError(f"--resolution ({args.resolution}) must be a multiple of {need} (8 for the pipelines, "
                          f"{vae_factor} for the VAE's latents); try {near}")
    teacher = args.pretrained_teacher_model
    folder = local_denoiser_folder(teacher) if os.path.isdir(teacher) else None
    if folder is not None:
        denoiser_cfg = read_json(teacher, folder, "config.json")
        family = family_of(denoiser_cfg)
        least = family.min_latent_side(denoiser_cfg) * vae_factor
        if args.resolution < least:
            raise ConfigError(f"--resolution ({args.resolution}) is below the {least} px that the teacher's "
                              f"{family.name} denoiser can sample (a {least // vae_factor}x{least // vae_factor} "
                              f"latent, one pixel after its downsamplings); use at least {math.lcm(least, need)}")
        problem = family.latent_side_problem(denoiser_cfg, args.resolution // vae_factor)
        if problem:
            raise ConfigError(f"--resolution ({args.resolution}, a {args.resolution // vae_factor}-pixel latent): "
                              f"{problem}")


def check_precision(args):
    """fp16 needs an accelerator: CPU autocast runs bf16 only, and fp16 weights meet fp32 activations at step 0."""
    import torch

    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not (
        torch.cuda.is_available() or getattr(torch, "xpu", None) and torch.xpu.is_available()
        or torch.backends.mps.is_available())
    if precision == "fp16" and on_cpu:
        raise ConfigError("--mixed_precision fp16 needs a GPU: on CPU, PyTorch autocasts to bf16 only, so use "
                          "--mixed_precision bf16 (or no)")


def validate_resume(args):
    """A named checkpoint must exist; 'latest' may find none (a new run starts)."""
    name = args.resume_from_checkpoint
    if name is None or name == "latest":
        return
    if not (os.path.isdir(name) or os.path.isdir(os.path.join(args.output_dir, os.path.basename(name)))):
        raise ConfigError(f"--resume_from_checkpoint: '{name}' does not exist in '{args.output_dir}'; "
                          f"use 'latest' or one of the checkpoint-<step> folders")


def check_resume_teacher(args):
    """Refuse, in one line and before any weights load, a resume on another teacher than the checkpoint's: another
    family or architecture always (its weights cannot fit), other weights or prediction type unless
    --allow_teacher_change says it is meant."""
    path = ckpt.find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        return
    recorded = ckpt.read_json(os.path.join(path, ckpt.STATE_FILE)).get("teacher")
    if recorded is None:  # written before checkpoints recorded their teacher
        return
    ours = teacher_identity(args)
    was = f"'{path}' was trained against '{recorded['teacher']}'"
    now = f"this run's --pretrained_teacher_model '{args.pretrained_teacher_model}'"
    if recorded["family"] != ours["family"]:
        raise ConfigError(f"--resume_from_checkpoint: {was} ({recorded['family']}); {now} is {ours['family']}: a "
                          f"student cannot change family; resume with the teacher it was trained against, or start "
                          f"a new --output_dir")
    if recorded.get("text_encoders", ours["text_encoders"]) != ours["text_encoders"]:
        raise ConfigError(f"--resume_from_checkpoint: {was} with the prompts encoded by "
                          f"{', '.join(recorded['text_encoders'])}; this run encodes them with "
                          f"{', '.join(ours['text_encoders'])}; resume with the text-encoder flags it was trained "
                          f"with (--without_t5)")
    if args.allow_teacher_change:
        return
    if recorded["denoiser_config"] != ours["denoiser_config"]:
        differs = "has another denoiser config (architecture)"
    elif recorded["prediction_type"] != ours["prediction_type"]:
        differs = f"predicts {ours['prediction_type']}, not {recorded['prediction_type']}"
    elif weights_differ(recorded["weights"], ours["weights"]):
        differs = "has other denoiser weights"
    else:
        return
    raise ConfigError(f"--resume_from_checkpoint: {was}; {now} {differs}; resume with the teacher it was trained "
                      f"against, or pass --allow_teacher_change if continuing on this teacher is intended")
