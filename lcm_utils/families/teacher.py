"""Loading the teacher (from a local diffusers folder or a Hub id) and encoding its images.

Paths and ids are passed through to `from_pretrained` unchanged, so a local folder loads exactly as the same model
would from the Hub. What is loaded, and from which subfolder, the teacher's family says.
"""

import contextlib
from dataclasses import dataclass

import torch

from ..objectives import SCHEDULES
from ..tensors import to_device, to_latent_space
from .registry import pretrained_source, teacher_family


@dataclass
class Teacher:
    """The frozen parts of a teacher; `family` holds its text encoders and knows its kind."""

    noise_scheduler: object  # the family's noise schedule (DDPMScheduler for SD/SDXL, flow matching for SD3)
    family: object  # a StableDiffusion / StableDiffusionXL instance, with its tokenizers and text encoders
    vae: torch.nn.Module
    denoiser: torch.nn.Module

    @property
    def prediction_type(self):
        return self.family.prediction_type(self.noise_scheduler.config)

    def pipeline(self, denoiser, scheduler):
        """The family's stock pipeline with this teacher's text parts and VAE and the given denoiser and scheduler."""
        return self.family.pipeline(self.vae, denoiser, scheduler)

    def scheduler(self, scheduler_cls, **overrides):
        """A scheduler of `scheduler_cls` on this teacher's schedule (a class or a diffusers class name)."""
        if isinstance(scheduler_cls, str):
            import diffusers

            scheduler_cls = getattr(diffusers, scheduler_cls)
        return self.family.scheduler(self.noise_scheduler, scheduler_cls, **overrides)

    def solver_schedule(self, num_ddim_timesteps, timestep_scaling, device):
        """The schedule and solver grid the objectives read, on the training device."""
        schedule = SCHEDULES[self.family.schedule_kind]
        return schedule.from_scheduler(self.noise_scheduler, num_ddim_timesteps, timestep_scaling, device)

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


def vae_scale_factor(vae_config):
    """Pixels per latent along each side: the VAE halves the size at every block but the last (8 for SD's)."""
    return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)


def pipeline_settings(path, src):
    """model_index.json of the teacher (local or Hub) as a dict; {} when the folder has none."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path, **src))
    except (OSError, ValueError):  # a folder of components without model_index.json is a valid teacher
        return {}


def load_encoders(args, device, weight_dtype):
    """(family with its tokenizers and frozen text encoders, frozen VAE) on `device`; the VAE in fp32 when its config
    sets force_upcast, else in `weight_dtype` (lcm_utils.precompute needs only these)."""
    from diffusers import AutoencoderKL

    src, path = pretrained_source(args), args.pretrained_teacher_model
    force_zeros = pipeline_settings(path, src).get("force_zeros_for_empty_prompt")
    family = teacher_family(args).load(path, src, device, weight_dtype, force_zeros, args.without_t5)
    if args.pretrained_vae_model_name_or_path:  # e.g. SDXL's fp16-fix VAE, which sets force_upcast false
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **src)
    # SD's and SDXL's own VAEs overflow in fp16 and say so with force_upcast (AutoencoderKL's default).
    vae_dtype = torch.float32 if vae.config.get("force_upcast", True) else weight_dtype
    return family, vae.requires_grad_(False).eval().to(device, dtype=vae_dtype)


def load_teacher_denoiser(args, family_cls=None):
    """A fresh copy of the teacher's denoiser (fp32, on the CPU): validation's references and LoRA base."""
    family_cls = family_cls or teacher_family(args)
    return family_cls.load_denoiser(args.pretrained_teacher_model, pretrained_source(args))


def load_teacher(args, device, weight_dtype, encoders_device=None, denoiser_dtype=torch.float32):
    """Load scheduler, text encoders, VAE and denoiser, frozen; dtypes as described in the README. The VAE and text
    encoders go to `encoders_device` (default `device`): the CPU when training from precomputed shards. The
    denoiser reaches `device` already in `denoiser_dtype`: a cast LoRA base never holds fp32 weights there."""
    src, path = pretrained_source(args), args.pretrained_teacher_model
    family_cls = teacher_family(args)
    noise_scheduler = family_cls.load_noise_scheduler(path, src)
    family, vae = load_encoders(args, device if encoders_device is None else encoders_device, weight_dtype)
    denoiser = family_cls.load_denoiser(path, src)
    # fp32 unless the method says otherwise: a full student is copied from it first, cast_teacher_unet afterwards.
    denoiser.requires_grad_(False).eval().to(device, dtype=denoiser_dtype)
    return Teacher(noise_scheduler, family, vae, denoiser)


@torch.no_grad()
def encode_images(teacher, pixel_values, chunk_size, generator=None):
    """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents z0 [B, C, H/f, W/f] (a posterior sample)."""
    vae = teacher.vae
    latents = []
    for chunk in pixel_values.split(chunk_size):
        dist = vae.encode(to_device(chunk, vae.device).to(vae.dtype)).latent_dist
        latents.append(dist.sample(generator=generator))
    return to_latent_space(torch.cat(latents).float(), vae.config.scaling_factor,
                           getattr(vae.config, "shift_factor", None))
