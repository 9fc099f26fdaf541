"""The latent consistency distillation objective (LCM paper, arXiv 2310.04378, Algorithm 1), as one callable.

The loop only calls `lcd_loss` and steps the optimizer (the shape of EDM's training/loss.py). The three
networks come in as callables so full distillation and LCM-LoRA share this code:
    student(z, t, cond, w) -> raw UNet output (with grad)
    teacher(z, t, cond)    -> raw UNet output (cond and uncond stacked on the batch axis)
    target(z, t, cond, w)  -> raw UNet output (EMA or no-grad student)
`cond` is a dict of UNet keyword arguments (e.g. encoder_hidden_states), batched on dim 0.
"""

from dataclasses import dataclass

import torch

from .consistency import (
    LOSSES,
    alpha_sigma,
    boundary_scalings,
    cfg_combine,
    consistency_output,
    ddim_step,
    ddim_timesteps,
    predicted_eps,
    predicted_x0,
    sample_timestep_pairs,
    skip_size,
)


@dataclass
class SolverSchedule:
    """The teacher's noise schedule and the skipping-step DDIM grid, on the training device."""

    alphas_cumprod: torch.Tensor  # [T] float32
    grid: torch.Tensor  # [N] long: t_i = (i+1)k - 1
    k: int
    prediction_type: str
    timestep_scaling: float

    @classmethod
    def from_scheduler(cls, noise_scheduler, num_ddim_timesteps, timestep_scaling, device):
        T = noise_scheduler.config.num_train_timesteps
        return cls(noise_scheduler.alphas_cumprod.to(device, torch.float32),
                   ddim_timesteps(T, num_ddim_timesteps).to(device), skip_size(T, num_ddim_timesteps),
                   noise_scheduler.config.prediction_type, timestep_scaling)

    def f_theta(self, raw_output, z, t):
        """Consistency function c_skip(t) z + c_out(t) x0(raw_output) (LCM eq. 9)."""
        alpha, sigma = alpha_sigma(self.alphas_cumprod, t, z.ndim)
        x0 = predicted_x0(raw_output.float(), z, alpha, sigma, self.prediction_type)
        c_skip, c_out = boundary_scalings(t, self.timestep_scaling)
        return consistency_output(z, x0, c_skip, c_out)


def stack_conditions(cond, uncond):
    """Concatenate two condition dicts (possibly nested) on the batch axis: [cond; uncond]."""
    if isinstance(cond, dict):
        return {key: stack_conditions(cond[key], uncond[key]) for key in cond}
    return torch.cat([cond, uncond.expand_as(cond)])


def lcd_loss(z0, cond, uncond, w, student, teacher, target, schedule, loss_type, huber_c, generator):
    """Latent consistency distillation loss for one batch. z0: [B, C, h, w] scaled latents; w: [B] guidance."""
    # 1. Sample a DDIM interval: start s = t_{n+k} on the grid, end t = t_n = max(s - k, 0).
    start, end = sample_timestep_pairs(schedule.grid, schedule.k, z0.shape[0], generator)

    # 2. Forward diffusion to the start: z_s = alpha_s z0 + sigma_s eps.
    noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device)
    alpha_s, sigma_s = alpha_sigma(schedule.alphas_cumprod, start, z0.ndim)
    z_start = alpha_s * z0 + sigma_s * noise

    # 3. Online consistency prediction f_theta(z_s, w, c, s).
    pred = schedule.f_theta(student(z_start, start, cond, w), z_start, start)

    with torch.no_grad():
        # 4. Teacher: one batched cond+uncond forward, CFG with w (LCM eq. 12), DDIM step (eta 0) s -> t.
        both = teacher(torch.cat([z_start, z_start]), torch.cat([start, start]), stack_conditions(cond, uncond))
        out_cond, out_uncond = both.float().chunk(2)
        x0_teacher = cfg_combine(predicted_x0(out_cond, z_start, alpha_s, sigma_s, schedule.prediction_type),
                                 predicted_x0(out_uncond, z_start, alpha_s, sigma_s, schedule.prediction_type), w)
        eps_teacher = cfg_combine(predicted_eps(out_cond, z_start, alpha_s, sigma_s, schedule.prediction_type),
                                  predicted_eps(out_uncond, z_start, alpha_s, sigma_s, schedule.prediction_type), w)
        z_end = ddim_step(x0_teacher, eps_teacher, schedule.alphas_cumprod, end)

        # 5. Target consistency prediction f_theta-(z_t, w, c, t).
        target_pred = schedule.f_theta(target(z_end, end, cond, w), z_end, end)

    # 6. Consistency distance d(pred, target): L2 or pseudo-Huber.
    return LOSSES[loss_type](pred.float(), target_pred.float(), huber_c)
