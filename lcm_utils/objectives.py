"""The consistency objectives (LCM, TCD, PCM) in one registry, and the distillation loss as one callable.

Each objective says where on the trajectory both consistency predictions map to (its targets, from the cited
pure functions in lcm_utils.consistency), and what its student samples with: the scheduler it exports, that
scheduler's arguments and a good step count, its validation columns and its model-card text.

The loop only calls `lcd_loss` (LCM paper, arXiv 2310.04378, Algorithm 1) and steps the optimizer (the shape of
EDM's training/loss.py). The three
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
    phase_edge,
    phase_edges,
    predicted_eps,
    predicted_x0,
    sample_timestep_pairs,
    sample_trajectory_points,
    skip_size,
    trajectory_consistency,
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


class LCM:
    """Latent consistency (LCM): every point of the trajectory maps to its origin, through c_skip/c_out."""

    name = "lcm"
    title = "latent consistency distillation (LCM)"
    scheduler_class_name = "LCMScheduler"
    sampling_steps = 4  # the model card's suggestion
    announcement = ""  # said in the run's start line (LCM is the default: nothing)

    def target_points(self, start, end, schedule, generator):
        """The s every prediction of this pair maps to: none, the origin is implied (and nothing is drawn)."""
        return None

    def consistency(self, schedule, raw_output, z, t, s):
        return schedule.f_theta(raw_output, z, t)

    def scheduler_overrides(self, timestep_scaling, num_ddim_timesteps):
        """The exported scheduler's settings on top of the teacher's schedule: this run's LCM scalings and grid."""
        return {"timestep_scaling": timestep_scaling, "original_inference_steps": num_ddim_timesteps}

    def sampling_kwargs(self):
        """Pipeline call arguments of the exported scheduler (LCMScheduler takes none)."""
        return {}

    def tags(self):
        return []

    def sampling_note(self):
        return ("Sample with 1-8 steps and the `LCMScheduler` saved in `scheduler/` (its `timestep_scaling` and "
                "`original_inference_steps` match this training run).")


class TCD(LCM):
    """Trajectory consistency (TCD): both predictions map to a point s drawn at or below the solver's end; sampled
    with TCDScheduler and its gamma (the pipelines' `eta`)."""

    name = "tcd"
    title = "trajectory consistency distillation (TCD, arXiv 2402.19159)"
    scheduler_class_name = "TCDScheduler"

    def __init__(self, gamma=0.3):
        self.gamma = gamma
        self.announcement = f" with the {self.name.upper()} objective"

    def target_points(self, start, end, schedule, generator):
        return sample_trajectory_points(schedule.grid, end, generator)

    def consistency(self, schedule, raw_output, z, t, s):
        return trajectory_consistency(raw_output.float(), z, t, s, schedule.alphas_cumprod, schedule.prediction_type)

    def scheduler_overrides(self, timestep_scaling, num_ddim_timesteps):
        return {"original_inference_steps": num_ddim_timesteps}

    def sampling_kwargs(self):
        return {"eta": self.gamma}

    def tags(self):
        return [self.name]

    def sampling_note(self):
        return (f"Sample with 2-8 steps and the `TCDScheduler` saved in `scheduler/`, passing its gamma as `eta` "
                f"({self.gamma:g} in training's validation; 0 is deterministic, higher adds detail-refreshing "
                f"noise at each step).")


class PCM(TCD):
    """Phased consistency (PCM): the trajectory cut into phases at the edges an M-step sampler visits; both
    predictions map to the edge below the start, so M steps walk the teacher's ODE edge to edge (TCDScheduler with
    gamma 0 and M steps)."""

    name = "pcm"
    title = "phased consistency distillation (PCM, arXiv 2405.18407)"

    def __init__(self, num_phases):
        super().__init__(gamma=0.0)
        self.num_phases = num_phases
        self.sampling_steps = num_phases

    def target_points(self, start, end, schedule, generator):
        return phase_edge(start, phase_edges(schedule.grid.cpu(), self.num_phases))

    def sampling_note(self):
        return (f"Sample with {self.num_phases} steps (its {self.num_phases} phases) and the `TCDScheduler` saved in "
                f"`scheduler/` with `eta=0`: each step then maps one phase edge to the next along the teacher's ODE.")


OBJECTIVES = {"lcm": lambda num_phases, tcd_gamma: LCM(), "tcd": lambda num_phases, tcd_gamma: TCD(tcd_gamma),
              "pcm": lambda num_phases, tcd_gamma: PCM(num_phases)}


def make_objective(name, num_phases=4, tcd_gamma=0.3):
    """The objective of --objective (lcm, tcd, pcm) with its --num_phases / --tcd_gamma."""
    return OBJECTIVES[name](num_phases, tcd_gamma)


def stack_conditions(cond, uncond):
    """Concatenate two condition dicts (possibly nested) on the batch axis: [cond; uncond]."""
    if isinstance(cond, dict):
        return {key: stack_conditions(cond[key], uncond[key]) for key in cond}
    return torch.cat([cond, uncond.expand_as(cond)])


def lcd_loss(z0, cond, uncond, w, student, teacher, target, schedule, loss_type, huber_c, generator, objective=None):
    """Latent consistency distillation loss for one batch. z0: [B, C, h, w] scaled latents; w: [B] guidance.
    objective: LCM (default), TCD or PCM: where on the trajectory both predictions map to."""
    objective = objective or LCM()
    # 1. Sample a DDIM interval: start s = t_{n+k} on the grid, end t = t_n = max(s - k, 0).
    start, end = sample_timestep_pairs(schedule.grid, schedule.k, z0.shape[0], generator)

    # 2. Forward diffusion to the start: z_s = alpha_s z0 + sigma_s eps.
    noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device)
    alpha_s, sigma_s = alpha_sigma(schedule.alphas_cumprod, start, z0.ndim)
    z_start = alpha_s * z0 + sigma_s * noise

    # 3. Online consistency prediction f_theta(z_s, w, c, s), to the objective's target point (LCM: the origin).
    point = objective.target_points(start, end, schedule, generator)
    pred = objective.consistency(schedule, student(z_start, start, cond, w), z_start, start, point)

    with torch.no_grad():
        # 4. Teacher: one batched cond+uncond forward, CFG with w (LCM eq. 12), DDIM step (eta 0) s -> t.
        both = teacher(torch.cat([z_start, z_start]), torch.cat([start, start]), stack_conditions(cond, uncond))
        out_cond, out_uncond = both.float().chunk(2)
        x0_teacher = cfg_combine(predicted_x0(out_cond, z_start, alpha_s, sigma_s, schedule.prediction_type),
                                 predicted_x0(out_uncond, z_start, alpha_s, sigma_s, schedule.prediction_type), w)
        eps_teacher = cfg_combine(predicted_eps(out_cond, z_start, alpha_s, sigma_s, schedule.prediction_type),
                                  predicted_eps(out_uncond, z_start, alpha_s, sigma_s, schedule.prediction_type), w)
        z_end = ddim_step(x0_teacher, eps_teacher, schedule.alphas_cumprod, end)

        # 5. Target consistency prediction f_theta-(z_t, w, c, t), to the same point.
        target_pred = objective.consistency(schedule, target(z_end, end, cond, w), z_end, end, point)

    # 6. Consistency distance d(pred, target): L2 or pseudo-Huber.
    return LOSSES[loss_type](pred.float(), target_pred.float(), huber_c)
