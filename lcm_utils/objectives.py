"""The consistency objectives (LCM, TCD, PCM) in one registry, and the distillation loss as one callable.

Each objective says where on the trajectory both consistency predictions map to (its targets, from the cited
pure functions in lcm_utils.consistency), and what its student samples with: the scheduler it exports, that
scheduler's arguments and a good step count, its validation columns and its model-card text.

The loop calls `consistency_pair` (LCM paper, arXiv 2310.04378, Algorithm 1, steps 1-5), compares the pair with
a distance from lcm_utils.consistency.LOSSES, and steps the optimizer (the shape of EDM's training/loss.py);
`lcd_loss` is the two together, as one callable for tests and benchmarks. The three
networks come in as callables so full distillation and LCM-LoRA share this code:
    student(z, t, cond, w) -> raw UNet output (with grad)
    teacher(z, t, cond)    -> raw UNet output (cond and uncond stacked on the batch axis)
    target(z, t, cond, w)  -> raw UNet output (EMA or no-grad student)
`cond` is a dict of UNet keyword arguments (e.g. encoder_hidden_states), batched on dim 0.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from .consistency import (
    LOSSES,
    alpha_sigma,
    boundary_scalings,
    cfg_combine,
    consistency_output,
    ddim_step,
    ddim_timesteps,
    flow_alpha_sigma,
    flow_euler_terminal,
    flow_phase_edges,
    flow_point,
    forward_transition,
    phase_edge,
    phase_edges,
    predicted_eps,
    predicted_x0,
    sample_grid_intervals,
    sample_timestep_pairs,
    sample_trajectory_points,
    skip_size,
)


class Schedule:
    """What the objectives read of a teacher's schedule: z_t = alpha_t x0 + sigma_t eps at the times t its
    denoiser takes, the solver grid, and the points its samplers visit. A subclass gives alpha_sigma, intervals,
    point and edges_for; the consistency functions below are the same on every schedule."""

    def phase_edges(self, num_phases):
        """PCM's phase edges [M] ascending, 0 first, on the training device; computed once per phase count (the
        loss asks every step)."""
        cache = self.__dict__.setdefault("_edges", {})
        if num_phases not in cache:
            cache[num_phases] = self.edges_for(num_phases).to(self.grid.device)
        return cache[num_phases]

    def f_theta(self, raw_output, z, t):
        """Consistency function c_skip(t) z + c_out(t) x0(raw_output) (LCM eq. 9)."""
        alpha, sigma = self.alpha_sigma(t, z.ndim)
        x0 = predicted_x0(raw_output.float(), z, alpha, sigma, self.prediction_type)
        c_skip, c_out = boundary_scalings(t, self.timestep_scaling)
        return consistency_output(z, x0, c_skip, c_out)

    def trajectory(self, raw_output, z, t, s):
        """f_theta(z_t, t, s) = alpha_s x0 + sigma_s eps with (x0, eps) from the output at t: the first-order
        trajectory consistency function (TCD; PCM with its phase edge as s); z_t itself at s = t."""
        alpha, sigma = self.alpha_sigma(t, z.ndim)
        x0 = predicted_x0(raw_output, z, alpha, sigma, self.prediction_type)
        eps = predicted_eps(raw_output, z, alpha, sigma, self.prediction_type)
        return self.point(x0, eps, s)

    def renoise(self, x, point, u, noise):
        """x at time `point` [B] (None: a clean x0) noised forward to the later times u [B]: q(z_u | z_point)."""
        alpha_u, sigma_u = self.alpha_sigma(u, x.ndim)
        if point is None:
            return alpha_u * x + sigma_u * noise
        alpha_s, sigma_s = self.alpha_sigma(point, x.ndim)
        return forward_transition(x, alpha_s, sigma_s, alpha_u, sigma_u, noise)


@dataclass
class SolverSchedule(Schedule):
    """A DDPM teacher's noise schedule (SD, SDXL) and the skipping-step DDIM grid, on the training device."""

    alphas_cumprod: torch.Tensor  # [T] float32
    grid: torch.Tensor  # [N] long: t_i = (i+1)k - 1
    k: int
    prediction_type: str
    timestep_scaling: float
    kind = "diffusion"

    @classmethod
    def from_scheduler(cls, noise_scheduler, num_ddim_timesteps, timestep_scaling, device):
        T = noise_scheduler.config.num_train_timesteps
        return cls(noise_scheduler.alphas_cumprod.to(device, torch.float32),
                   ddim_timesteps(T, num_ddim_timesteps).to(device), skip_size(T, num_ddim_timesteps),
                   noise_scheduler.config.prediction_type, timestep_scaling)

    def alpha_sigma(self, t, ndim):
        return alpha_sigma(self.alphas_cumprod, t, ndim)

    def intervals(self, batch_size, generator):
        """(start, end) [B] each: one skipping-step interval of the grid per sample."""
        return sample_timestep_pairs(self.grid, self.k, batch_size, generator)

    def point(self, x0, eps, t):
        """z_t = alpha_t x0 + sigma_t eps: the DDIM step (eta 0) to t."""
        return ddim_step(x0, eps, self.alphas_cumprod, t)

    def edges_for(self, num_phases):
        return phase_edges(self.grid.cpu(), num_phases)

    def draw_times(self, low, high, generator, power=1.0):
        """A timestep u ~ U{low, ..., high - 1} per sample (low where high = low): [B], [B] -> [B] long. power > 1
        draws low + (high - low) r^power instead: skewed towards low (mean at 1/(power + 1) of the span)."""
        r = torch.rand(low.shape, generator=generator, device=generator.device).to(low.device)
        return low + ((r if power == 1.0 else r ** power) * (high - low).float()).long()


@dataclass
class FlowSchedule(Schedule):
    """A flow-matching teacher's schedule (SD3): z_t = (1 - sigma) x0 + sigma eps at the time t = sigma * T its
    denoiser takes; the grid is every k-th point of its shifted sigma table, so --num_ddim_timesteps counts points
    of that table as it does on a DDPM schedule, and each solver step is an Euler step with the guided velocity."""

    grid: torch.Tensor  # [N] float32 times sigma * T, ascending: the table's points (i+1)k - 1
    k: int
    num_train_timesteps: int
    shift: float
    sigma_max: float  # the table's ends, which the stock Euler sampler's grids start from
    sigma_min: float
    timestep_scaling: float
    prediction_type: str = "flow"
    kind = "flow"

    @classmethod
    def from_scheduler(cls, noise_scheduler, num_ddim_timesteps, timestep_scaling, device):
        config = noise_scheduler.config
        if config.get("use_dynamic_shifting"):
            raise ValueError("a flow-matching teacher with use_dynamic_shifting (a resolution-dependent shift) is not "
                             "supported; its scheduler_config.json must give a fixed shift")
        T = config.num_train_timesteps
        fresh = type(noise_scheduler).from_config(config)  # its table as built, whatever was set on the teacher's
        table = fresh.timesteps.flip(0)  # [T] ascending, the times its pipeline feeds the denoiser
        return cls(table[ddim_timesteps(T, num_ddim_timesteps)].to(device, torch.float32),
                   skip_size(T, num_ddim_timesteps), T, float(config.shift), fresh.sigma_max, fresh.sigma_min,
                   timestep_scaling)

    def alpha_sigma(self, t, ndim):
        return flow_alpha_sigma(t, self.num_train_timesteps, ndim)

    def intervals(self, batch_size, generator):
        return sample_grid_intervals(self.grid, batch_size, generator)

    def point(self, x0, eps, t):
        return flow_point(x0, eps, self.alpha_sigma(t, x0.ndim)[1])

    def edges_for(self, num_phases):
        return flow_phase_edges(num_phases, self.shift, self.num_train_timesteps, self.sigma_max, self.sigma_min)

    def draw_times(self, low, high, generator, power=1.0):
        """A time u ~ U[low, high) per sample: [B], [B] -> [B] float (power > 1: low + (high - low) r^power)."""
        r = torch.rand(low.shape, generator=generator, device=generator.device).to(low.device)
        return low + (r if power == 1.0 else r ** power) * (high - low)


SCHEDULES = {"diffusion": SolverSchedule, "flow": FlowSchedule}


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

    def adversarial_span(self, start, point, schedule):
        """(low, high) [B] each: the times the adversarial term noises a pair's predictions to, from the point they
        map to (the origin: 0) up to the top of the grid, the one phase of a model that maps everything there."""
        low = torch.zeros_like(start) if point is None else point
        return low, schedule.grid[-1].expand_as(start)

    flow_scheduler_class_name = "FlowMatchLCMScheduler"  # on a flow schedule: x0 = z - sigma v, then renoise

    def scheduler_class(self, kind="diffusion"):
        """The class name of the scheduler the student samples with, on a `kind` ("diffusion", "flow") schedule."""
        return self.flow_scheduler_class_name if kind == "flow" else self.scheduler_class_name

    def scheduler_overrides(self, timestep_scaling, num_ddim_timesteps, kind="diffusion", shift=None):
        """The exported scheduler's settings on top of the teacher's schedule: this run's LCM scalings and grid
        (FlowMatchLCMScheduler has neither: c_skip/c_out are ~0/1 at every point it visits)."""
        if kind == "flow":
            return {}
        return {"timestep_scaling": timestep_scaling, "original_inference_steps": num_ddim_timesteps}

    def sampling_kwargs(self, kind="diffusion"):
        """Pipeline call arguments of the exported scheduler (LCMScheduler takes none)."""
        return {}

    def tags(self):
        return []

    def sampling_note(self, kind="diffusion"):
        if kind == "flow":
            return "Sample with 1-8 steps and the `FlowMatchLCMScheduler` saved in `scheduler/`."
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
        return schedule.trajectory(raw_output.float(), z, t, s)

    # No stock flow scheduler takes TCD's gamma: Euler is its gamma 0 (FlowMatchLCMScheduler its gamma 1).
    flow_scheduler_class_name = "FlowMatchEulerDiscreteScheduler"

    def scheduler_overrides(self, timestep_scaling, num_ddim_timesteps, kind="diffusion", shift=None):
        if kind == "flow":
            return {}
        return {"original_inference_steps": num_ddim_timesteps}

    def sampling_kwargs(self, kind="diffusion"):
        return {} if kind == "flow" else {"eta": self.gamma}

    def tags(self):
        return [self.name]

    def sampling_note(self, kind="diffusion"):
        if kind == "flow":
            return (f"Sample with 2-8 steps and the `FlowMatchEulerDiscreteScheduler` saved in `scheduler/`: TCD's "
                    f"gamma 0 (no stock flow-matching scheduler takes gamma; training drew with {self.gamma:g}).")
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
        return phase_edge(start, schedule.phase_edges(self.num_phases))

    def adversarial_span(self, start, point, schedule):
        """From the phase's lower edge (the point) to its upper one (the top of the grid for the last phase), as
        PCM's adversarial loss draws its timestep inside the phase."""
        edges = schedule.phase_edges(self.num_phases)
        above = torch.searchsorted(edges, point, right=True)
        upper = edges[above.clamp(max=len(edges) - 1)]
        return point, torch.where(above < len(edges), upper, schedule.grid[-1])

    def scheduler_overrides(self, timestep_scaling, num_ddim_timesteps, kind="diffusion", shift=None):
        if kind == "flow":  # Euler with M steps then visits exactly the edges (FlowSchedule.phase_edges), whatever
            # other grid the teacher's config asks for
            terminal = flow_euler_terminal(self.num_phases, shift)
            plain = {name: False for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                              "invert_sigmas", "stochastic_sampling")}
            return {**plain, "shift_terminal": terminal}
        return super().scheduler_overrides(timestep_scaling, num_ddim_timesteps)

    def sampling_note(self, kind="diffusion"):
        sampler = "`FlowMatchEulerDiscreteScheduler`" if kind == "flow" else "`TCDScheduler`"
        return (f"Sample with {self.num_phases} steps (its {self.num_phases} phases) and the {sampler} saved in "
                f"`scheduler/`{'' if kind == 'flow' else ' with `eta=0`'}: each step then maps one phase edge to "
                f"the next along the teacher's ODE.")


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


@dataclass
class ConsistencyPair:
    """Both consistency predictions of a batch: pred (with grad) and target [B, C, h, w], the interval's start [B]
    and the point both map to [B] (None: the origin); student_x0(): the student's clean estimate at the start (with
    grad), computed only when asked for (the adversarial term's fake under --adv_fake x0)."""

    pred: torch.Tensor
    target: torch.Tensor
    start: torch.Tensor
    point: torch.Tensor | None
    student_x0: Callable[[], torch.Tensor] | None = None


def lcd_loss(z0, cond, uncond, w, student, teacher, target, schedule, loss_type, huber_c, generator, objective=None):
    """Latent consistency distillation loss for one batch. z0: [B, C, h, w] scaled latents; w: [B] guidance.
    objective: LCM (default), TCD or PCM: where on the trajectory both predictions map to."""
    pair = consistency_pair(z0, cond, uncond, w, student, teacher, target, schedule, generator, objective)
    # 6. Consistency distance d(pred, target): L2 or pseudo-Huber.
    return LOSSES[loss_type](pair.pred.float(), pair.target.float(), huber_c)


def consistency_pair(z0, cond, uncond, w, student, teacher, target, schedule, generator, objective=None):
    """Steps 1-5 of LCM Algorithm 1 for one batch: the online and the target consistency predictions."""
    objective = objective or LCM()
    # 1. Sample a DDIM interval: start s = t_{n+k} on the grid, end t = t_n = max(s - k, 0).
    start, end = schedule.intervals(z0.shape[0], generator)

    # 2. Forward diffusion to the start: z_s = alpha_s z0 + sigma_s eps.
    noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device)
    alpha_s, sigma_s = schedule.alpha_sigma(start, z0.ndim)
    z_start = alpha_s * z0 + sigma_s * noise

    # 3. Online consistency prediction f_theta(z_s, w, c, s), to the objective's target point (LCM: the origin).
    point = objective.target_points(start, end, schedule, generator)
    if point is not None:  # a phase edge between two grid points (flow PCM) stops the solver step at the edge
        end = torch.maximum(end, point)
    raw_student = student(z_start, start, cond, w)
    pred = objective.consistency(schedule, raw_student, z_start, start, point)

    with torch.no_grad():
        # 4. Teacher: one batched cond+uncond forward, CFG with w (LCM eq. 12), DDIM step (eta 0) s -> t.
        both = teacher(torch.cat([z_start, z_start]), torch.cat([start, start]), stack_conditions(cond, uncond))
        out_cond, out_uncond = both.float().chunk(2)
        x0_teacher = cfg_combine(predicted_x0(out_cond, z_start, alpha_s, sigma_s, schedule.prediction_type),
                                 predicted_x0(out_uncond, z_start, alpha_s, sigma_s, schedule.prediction_type), w)
        eps_teacher = cfg_combine(predicted_eps(out_cond, z_start, alpha_s, sigma_s, schedule.prediction_type),
                                  predicted_eps(out_uncond, z_start, alpha_s, sigma_s, schedule.prediction_type), w)
        z_end = schedule.point(x0_teacher, eps_teacher, end)

        # 5. Target consistency prediction f_theta-(z_t, w, c, t), to the same point.
        target_pred = objective.consistency(schedule, target(z_end, end, cond, w), z_end, end, point)
    return ConsistencyPair(pred, target_pred, start, point, lambda: predicted_x0(
        raw_student.float(), z_start, alpha_s, sigma_s, schedule.prediction_type))
