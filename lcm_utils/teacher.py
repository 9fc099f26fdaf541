"""Loading the teacher (from a local diffusers folder or a Hub id), prompt/image encoding, the student.

Paths and ids are passed through to `from_pretrained` unchanged, so a local folder loads exactly as
the same model would from the Hub.
"""

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from .config import teacher_revision
from .family import family_of


@dataclass
class Teacher:
    """The frozen parts of a Stable Diffusion teacher; `family` holds its text encoders (SD or SDXL)."""

    noise_scheduler: object  # DDPMScheduler: alphas_cumprod, num_train_timesteps, prediction_type
    family: object  # lcm_utils.family.StableDiffusion or StableDiffusionXL, with its tokenizers and text encoders
    vae: torch.nn.Module
    unet: torch.nn.Module

    @property
    def prediction_type(self):
        return self.noise_scheduler.config.prediction_type

    def pipeline(self, unet, scheduler):
        """The family's stock pipeline with this teacher's text parts and VAE and the given UNet and scheduler."""
        return self.family.pipeline(self.vae, unet, scheduler)

    @contextlib.contextmanager
    def encoders_on(self, device):
        """The VAE and text encoders on `device` for the block (validation), then back where they were (a run from
        precomputed shards keeps them off the training device)."""
        parts = [self.vae] + list(self.family.text_encoders)
        homes = [next(part.parameters()).device for part in parts]
        for part in parts:
            part.to(device)
        try:
            yield
        finally:
            for part, home in zip(parts, homes):
                part.to(home)


def pipeline_settings(path, src):
    """model_index.json of the teacher (local or Hub) as a dict; {} when the folder has none."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path, **src))
    except (OSError, ValueError):  # a folder of components without model_index.json is a valid teacher
        return {}


def teacher_family(args):
    """The teacher's family class (SD or SDXL), from its UNet config alone (no weights); for a Hub id this is the
    first thing fetched, so a wrong id or path fails here, in one line, before anything heavy."""
    from diffusers import UNet2DConditionModel

    from .config import ConfigError

    src = dict(revision=teacher_revision(args), cache_dir=args.cache_dir)
    name = args.pretrained_teacher_model
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notes about its own arguments
            warnings.simplefilter("ignore", UserWarning)
            config = UNet2DConditionModel.load_config(name, subfolder="unet", **src)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--pretrained_teacher_model: '{name}' is not a folder here ({os.getcwd()}) and could not "
                          f"be loaded as a Hub model ({reason}); pass the teacher folder's path or a Hub id") from None
    return family_of(config)


def load_encoders(args, device, weight_dtype):
    """(family with its tokenizers and frozen text encoders, frozen VAE) on `device`; the VAE in fp32 when its config
    sets force_upcast, else in `weight_dtype` (lcm_utils.precompute needs only these)."""
    from diffusers import AutoencoderKL

    src = dict(revision=teacher_revision(args), cache_dir=args.cache_dir)
    path = args.pretrained_teacher_model
    force_zeros = pipeline_settings(path, src).get("force_zeros_for_empty_prompt")
    family = teacher_family(args).load(path, src, device, weight_dtype, force_zeros)
    if args.pretrained_vae_model_name_or_path:  # e.g. SDXL's fp16-fix VAE, which sets force_upcast false
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **src)
    # SD's and SDXL's own VAEs overflow in fp16 and say so with force_upcast (AutoencoderKL's default).
    vae_dtype = torch.float32 if vae.config.get("force_upcast", True) else weight_dtype
    return family, vae.requires_grad_(False).eval().to(device, dtype=vae_dtype)


def load_teacher(args, device, weight_dtype, encoders_device=None):
    """Load scheduler, text encoders, VAE and UNet, frozen; dtypes as described in the README. The VAE and text
    encoders go to `encoders_device` (default `device`): the CPU when training from precomputed shards."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    src = dict(revision=teacher_revision(args), cache_dir=args.cache_dir)
    path = args.pretrained_teacher_model
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **src)
    family, vae = load_encoders(args, device if encoders_device is None else encoders_device, weight_dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **src)
    # The UNet stays fp32 here: the student is copied from it first; cast_teacher_unet applies afterwards.
    unet.requires_grad_(False).eval().to(device, dtype=torch.float32)
    return Teacher(noise_scheduler, family, vae, unet)


@torch.no_grad()
def encode_images(teacher, pixel_values, chunk_size, generator=None):
    """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents z0 [B, 4, H/f, W/f] (a posterior sample)."""
    vae = teacher.vae
    latents = []
    for chunk in pixel_values.split(chunk_size):
        dist = vae.encode(to_device(chunk, vae.device).to(vae.dtype)).latent_dist
        latents.append(dist.sample(generator=generator))
    return torch.cat(latents).float() * vae.config.scaling_factor


def to_device(tensor, device):
    """A host tensor on `device` without waiting for the work queued there: pinned, then copied non-blocking (a
    plain copy from pageable memory makes the host wait for the device's stream)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def build_student(teacher_unet, time_cond_proj_dim):
    """Student UNet = teacher weights + a w-embedding projection that starts at zero (student == teacher)."""
    from diffusers import UNet2DConditionModel

    config = dict(teacher_unet.config)
    # diffusers records which keys took their defaults and from_config re-applies those defaults, which would
    # drop the time_cond_proj_dim set below for a UNet built in memory (a loaded one has no such record).
    config.pop("_use_default_values", None)
    if config.get("time_cond_proj_dim") is None:
        config["time_cond_proj_dim"] = time_cond_proj_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj.") for k in missing):
        raise RuntimeError(f"teacher and student UNet differ beyond cond_proj: {missing[:4]} {unexpected[:4]}")
    if missing:
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        if student.time_embedding.cond_proj.bias is not None:
            torch.nn.init.zeros_(student.time_embedding.cond_proj.bias)
    return student.to(dtype=torch.float32)
