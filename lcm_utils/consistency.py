"""Consistency-distillation math: pure torch functions, no I/O, no accelerate, no argparse.

References (cited in the docstrings):
  LCM   Luo et al. 2023, "Latent Consistency Models", arXiv 2310.04378 (eq. 9, §4.3, §4.4, Algorithm 1).
  CM    Song et al. 2023, "Consistency Models", arXiv 2303.01469 (boundary condition, §3 / Appendix C).
  iCT   Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", arXiv 2310.14189 (§3.3).
  DDIM  Song et al. 2020, "Denoising Diffusion Implicit Models", arXiv 2010.02502 (eq. 12).
  TCD   Zheng et al. 2024, "Trajectory Consistency Distillation", arXiv 2402.19159 (the first-order trajectory
        consistency function; the target point s drawn below the solver's end).
  PCM   Wang et al. 2024, "Phased Consistency Models", arXiv 2405.18407 (consistency within phases, to the
        phase edge).
  RF    Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3),
        arXiv 2403.03206 (eq. 1 and §2: z_t = (1 - t) x0 + t eps, v = eps - x0; §5.3.2: timestep shifting).
  VDM   Kingma et al. 2021, "Variational Diffusion Models", arXiv 2107.00630 (§3.1: the forward transition
        q(z_t | z_s) between two noise levels).
  GGAN  Lim & Ye 2017, "Geometric GAN", arXiv 1705.02894 (the hinge loss of the discriminator).

Conventions: T = num_train_timesteps, N = num_ddim_timesteps, k = T // N, acp = alphas_cumprod [T],
alpha_t = sqrt(acp[t]), sigma_t = sqrt(1 - acp[t]), so z_t = alpha_t * x0 + sigma_t * eps.
Flow matching (SD3) writes the same z_t = alpha x0 + sigma eps with alpha = 1 - sigma, and t = sigma * T is the
time its denoiser takes (a float); the solver grid is every k-th point of the teacher's shifted sigma table.
B is the batch size; "[B, ...]" means any trailing latent shape, e.g. [B, 4, 64, 64].
"""

from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ddim_timesteps", "skip_size", "sample_timestep_pairs", "append_dims", "alpha_sigma",
    "boundary_scalings", "PREDICTION_TYPES", "predicted_x0", "predicted_eps", "guidance_embedding",
    "cfg_combine", "ddim_step", "consistency_output", "trajectory_consistency", "sample_trajectory_points",
    "phase_edges", "phase_edge", "l2_loss", "pseudo_huber_loss", "LOSSES", "ema_update",
    "flow_shift", "flow_alpha_sigma", "flow_point", "sample_grid_intervals", "flow_euler_terminal",
    "flow_phase_edges", "forward_transition", "hinge_discriminator_loss", "hinge_generator_loss",
]


# ---------------------------------------------------------------------------------------------
# Timesteps (LCM §4.4 "skipping-step": the teacher jumps k train steps per ODE-solver step)
# ---------------------------------------------------------------------------------------------

def skip_size(num_train_timesteps: int, num_ddim_timesteps: int) -> int:
    """Skip k = T // N of the skipping-step schedule (LCM §4.4); requires 0 < N <= T and N | T."""
    if num_ddim_timesteps <= 0 or num_ddim_timesteps > num_train_timesteps:
        raise ValueError(
            f"num_ddim_timesteps must be in 1..{num_train_timesteps} (num_train_timesteps), "
            f"got {num_ddim_timesteps}"
        )
    if num_train_timesteps % num_ddim_timesteps != 0:
        # An uneven grid would make the last jump shorter than k and the grid not end at T - 1.
        raise ValueError(
            f"num_train_timesteps ({num_train_timesteps}) must be divisible by "
            f"num_ddim_timesteps ({num_ddim_timesteps})"
        )
    return num_train_timesteps // num_ddim_timesteps


def ddim_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.LongTensor:
    """DDIM grid t_i = (i + 1) * k - 1, i = 0..N-1 (LCM Algorithm 1's t_{n+k}): [N], e.g. 19, 39, ..., 999."""
    k = skip_size(num_train_timesteps, num_ddim_timesteps)
    # The "- 1" makes the grid end at T - 1, the noisiest train step, where LCMScheduler sampling starts.
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * k - 1


def sample_timestep_pairs(
    grid: torch.LongTensor, k: int, batch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Draw n ~ U{0..N-1} per sample (LCM Algorithm 1): start t_{n+k} = grid[n], end t_n = max(start - k, 0).

    grid: [N] from ddim_timesteps; returns (start [B], end [B]) on grid's device.
    """
    # Draw on the generator's device so a seeded CPU generator gives the same pairs on any accelerator.
    device = generator.device if generator is not None else grid.device
    index = torch.randint(0, len(grid), (batch_size,), generator=generator, device=device).to(grid.device)
    start = grid[index]
    # The lowest grid point (k - 1) jumps to t = 0, the boundary where f_theta is the identity.
    end = (start - k).clamp(min=0)
    return start, end


# ---------------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------------

def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so [B] broadcasts against [B, ...] of `ndim` dims: [B, 1, ..., 1]."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims, more than the target ndim {ndim}")
    return x[(...,) + (None,) * missing]


def alpha_sigma(
    alphas_cumprod: torch.Tensor, t: torch.LongTensor, ndim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(acp[t]), sigma_t = sqrt(1 - acp[t]) (DDIM eq. 12 notation): [T], [B] -> [B, 1, ..., 1] each.

    float32, on t's device, with `ndim` dims in all.
    """
    # float32 regardless of the schedule's or latents' dtype: 1 - acp is tiny near t = 0 and loses
    # most of its digits in half precision; callers cast to the latents' dtype where they use it.
    acp = alphas_cumprod.float()[t.to(alphas_cumprod.device)].to(t.device)
    return append_dims(acp.sqrt(), ndim), append_dims((1.0 - acp).sqrt(), ndim)


def boundary_scalings(
    t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip = s^2 / (x^2 + s^2), c_out = x / sqrt(x^2 + s^2), x = timestep_scaling * t, s = sigma_data: [B], [B].

    The discrete form of the CM boundary condition (CM Appendix C) that diffusers' LCMScheduler samples
    with, so c_skip(0) = 1 and c_out(0) = 0 (f_theta is the identity at t = 0). Defaults: LCMScheduler's.
    """
    x = timestep_scaling * t.float()
    c_skip = sigma_data**2 / (x**2 + sigma_data**2)
    c_out = x / (x**2 + sigma_data**2).sqrt()
    return c_skip, c_out


# ---------------------------------------------------------------------------------------------
# Prediction types: every conversion is exact given z_t = alpha * x0 + sigma * eps
# ---------------------------------------------------------------------------------------------

class Parameterization(NamedTuple):
    """How one prediction type maps (model_output, z_t, alpha, sigma) to x0 and to eps."""

    x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    eps: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


PREDICTION_TYPES: dict[str, Parameterization] = {
    # eps-prediction (SD 1.x, SD 2.x-base): x0 = (z - sigma eps) / alpha, the x0 inside LCM eq. 9.
    "epsilon": Parameterization(
        x0=lambda out, z, alpha, sigma: (z - sigma * out) / alpha,
        eps=lambda out, z, alpha, sigma: out,
    ),
    # v-prediction (SD 2.x-768), v = alpha eps - sigma x0 (Salimans & Ho 2022, arXiv 2202.00512 §4);
    # converting v to eps before the DDIM step avoids the original LCM repo's bug of using raw v as noise.
    "v_prediction": Parameterization(
        x0=lambda out, z, alpha, sigma: alpha * z - sigma * out,
        eps=lambda out, z, alpha, sigma: alpha * out + sigma * z,
    ),
    # flow (SD3): the output is the velocity v = eps - x0 of z = (1 - sigma) x0 + sigma eps (RF eq. 1), so
    # x0 = z - sigma v and eps = z + (1 - sigma) v; exact only on a flow schedule, where alpha = 1 - sigma.
    "flow": Parameterization(
        x0=lambda out, z, alpha, sigma: z - sigma * out,
        eps=lambda out, z, alpha, sigma: z + alpha * out,
    ),
    # x0-prediction: the output is x0 itself.
    "sample": Parameterization(
        x0=lambda out, z, alpha, sigma: out,
        eps=lambda out, z, alpha, sigma: (z - alpha * out) / sigma,
    ),
}


def _parameterization(prediction_type: str) -> Parameterization:
    """Registry look-up with an error that lists the valid prediction types."""
    try:
        return PREDICTION_TYPES[prediction_type]
    except KeyError:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {sorted(PREDICTION_TYPES)}"
        ) from None


def predicted_x0(
    model_output: torch.Tensor, z_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 implied by the model output at z_t (LCM eq. 9 for epsilon; see PREDICTION_TYPES): [B, ...]."""
    convert = _parameterization(prediction_type).x0
    return convert(model_output, z_t, alpha.to(z_t), sigma.to(z_t))


def predicted_eps(
    model_output: torch.Tensor, z_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """eps implied by the model output at z_t (the noise term of DDIM eq. 12; see PREDICTION_TYPES): [B, ...]."""
    convert = _parameterization(prediction_type).eps
    return convert(model_output, z_t, alpha.to(z_t), sigma.to(z_t))


# ---------------------------------------------------------------------------------------------
# Guidance (LCM §4.3: one-stage guided distillation on the augmented PF-ODE)
# ---------------------------------------------------------------------------------------------

def guidance_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of 1000 * w (LCM §4.3's w-condition; VDM's timestep embedding): [B] -> [B, embedding_dim].

    Same numbers as diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding (sin half,
    then cos half, zero pad for odd dims), so a student trained here samples correctly with that pipeline.
    """
    if w.ndim != 1:
        raise ValueError(f"w must be 1-D [B], got shape {tuple(w.shape)}")
    if embedding_dim < 4:
        # half_dim - 1 is a divisor below; the pipeline's formula is undefined for dims < 4.
        raise ValueError(f"embedding_dim must be >= 4, got {embedding_dim}")
    half_dim = embedding_dim // 2
    # Built as the pipeline builds it (float32 log, then arange in `dtype`) so results are bit-identical. The
    # log is a CPU number: a tensor made on an accelerator from a Python float is a host-to-device copy, which
    # stalls the step (found by scripts/sync_check.py on a GPU).
    log_step = (torch.log(torch.tensor(10000.0)) / (half_dim - 1)).item()
    freqs = torch.exp(torch.arange(half_dim, dtype=dtype, device=w.device) * -log_step)
    args = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Guided prediction cond + w (cond - uncond) = (1 + w) cond - w uncond (LCM §4.3): [B, ...].

    w is the LCM paper's scale, i.e. Imagen/diffusers guidance_scale - 1; w = 0 gives cond. w: [B] or scalar.
    """
    w = torch.as_tensor(w, device=cond.device, dtype=cond.dtype)
    if w.ndim > 0:
        w = append_dims(w, cond.ndim)
    return cond + w * (cond - uncond)


# ---------------------------------------------------------------------------------------------
# ODE solver step and consistency function
# ---------------------------------------------------------------------------------------------

def ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t_end: torch.LongTensor
) -> torch.Tensor:
    """DDIM step, eta = 0, to t_end (DDIM eq. 12): sqrt(acp[t_end]) x0 + sqrt(1 - acp[t_end]) eps: [B, ...].

    This is the Psi solver of LCM Algorithm 1; x0 and eps are the (guided) predictions made at the start.
    """
    alpha, sigma = alpha_sigma(alphas_cumprod, t_end, x0.ndim)
    return alpha.to(x0) * x0 + sigma.to(x0) * eps


def consistency_output(
    z_t: torch.Tensor, x0: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor
) -> torch.Tensor:
    """f_theta(z_t, t) = c_skip(t) z_t + c_out(t) x0 (LCM eq. 9 parameterisation): c_skip, c_out [B] -> [B, ...]."""
    c_skip = append_dims(c_skip, z_t.ndim).to(z_t)
    c_out = append_dims(c_out, z_t.ndim).to(z_t)
    return c_skip * z_t + c_out * x0


# ---------------------------------------------------------------------------------------------
# Losses: d(., .) of LCM Algorithm 1; same signature so the loop picks one by name from LOSSES
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Beyond LCM: consistency to an earlier point s of the trajectory (TCD, PCM)
# ---------------------------------------------------------------------------------------------

def trajectory_consistency(
    model_output: torch.Tensor, z_t: torch.Tensor, t: torch.LongTensor, s: torch.LongTensor,
    alphas_cumprod: torch.Tensor, prediction_type: str,
) -> torch.Tensor:
    """f_theta(z_t, t, s) = alpha_s x0 + sigma_s eps, (x0, eps) from the output at t: the first-order trajectory
    consistency function (TCD; PCM with its phase edge as s).
    A DDIM jump from t to any s <= t; at s = t it is z_t itself, the boundary condition without c_skip/c_out."""
    alpha, sigma = alpha_sigma(alphas_cumprod, t, z_t.ndim)
    x0 = predicted_x0(model_output, z_t, alpha, sigma, prediction_type)
    eps = predicted_eps(model_output, z_t, alpha, sigma, prediction_type)
    return ddim_step(x0, eps, alphas_cumprod, s)


def sample_trajectory_points(
    grid: torch.LongTensor, end: torch.LongTensor, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """TCD's target point s ~ U{t_0 = 0, t_1, ..., t_n}: a DDIM grid point at or below the solver's end t_n (or 0),
    m ~ U[0, n] (TCD): [N], [B] -> [B]."""
    device = generator.device if generator is not None else grid.device
    below = (grid.unsqueeze(0) <= end.unsqueeze(1)).sum(dim=1)  # [B]: grid points t_1..t_n at or below t_n
    u = torch.rand(end.shape, generator=generator, device=device).to(grid.device)
    m = (u * (below + 1).float()).long().clamp(max=below)  # U{0..n}
    return torch.where(m == 0, torch.zeros_like(end), grid[(m - 1).clamp(min=0)])


def phase_edges(grid: torch.LongTensor, num_phases: int) -> torch.LongTensor:
    """PCM's phase edges [num_phases], ascending, 0 first: where an M-step sampler stops. They are the
    timesteps diffusers' TCDScheduler visits with M inference steps on this grid (evenly spaced indices into the
    descending grid), less the first, plus 0, so a PCM student samples exactly edge to edge with it (gamma 0)."""
    if not 1 <= num_phases <= len(grid):
        raise ValueError(f"num_phases must be in 1..{len(grid)} (the DDIM grid), got {num_phases}")
    descending = grid.flip(0)
    visited = descending[(torch.arange(num_phases, dtype=torch.float64) * len(grid) / num_phases).floor().long()]
    return torch.cat([visited[1:], torch.zeros(1, dtype=grid.dtype)]).flip(0)


def phase_edge(t: torch.LongTensor, edges: torch.LongTensor) -> torch.LongTensor:
    """The edge a PCM student maps t to: the largest phase edge below t (t on the grid, so t > 0): [B] -> [B]."""
    index = torch.searchsorted(edges.to(t.device), t, right=False) - 1
    return edges.to(t.device)[index.clamp(min=0)]


# ---------------------------------------------------------------------------------------------
# Flow matching (SD3): the same interval, point and phase functions on a sigma schedule
# ---------------------------------------------------------------------------------------------

def flow_shift(u: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """sigma = shift u / (1 + (shift - 1) u): the timestep shift of RF §5.3.2 (shift 3 for SD3), u in [0, 1]."""
    return shift * u / (1 + (shift - 1) * u)


def flow_alpha_sigma(t: torch.Tensor, num_train_timesteps: int, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = 1 - sigma, sigma = t / T for the flow time t = sigma * T the denoiser takes (RF eq. 1): [B] ->
    [B, 1, ..., 1] each, float32, with `ndim` dims in all."""
    sigma = t.float() / num_train_timesteps
    return append_dims(1.0 - sigma, ndim), append_dims(sigma, ndim)


def flow_point(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_s = (1 - sigma_s) x0 + sigma_s eps (RF eq. 1): the point at sigma_s of the straight path through (x0, eps);
    with x0, eps from one velocity v at sigma_t it is the Euler step z_t + (sigma_s - sigma_t) v. sigma: [B, 1, ...]."""
    return (1.0 - sigma).to(x0) * x0 + sigma.to(x0) * eps


def sample_grid_intervals(
    grid: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n ~ U{0..N-1} per sample (LCM Algorithm 1): start grid[n], end grid[n-1] (0, the data, below grid[0]).
    The flow form of sample_timestep_pairs, whose grid is not evenly spaced in t: [N] -> ([B], [B])."""
    device = generator.device if generator is not None else grid.device
    index = torch.randint(0, len(grid), (batch_size,), generator=generator, device=device).to(grid.device)
    below = grid[(index - 1).clamp(min=0)]
    return grid[index], torch.where(index > 0, below, torch.zeros_like(below))


def flow_euler_terminal(num_phases: int, shift: float) -> float | None:
    """The last sigma before 0 that a PCM student's M-step Euler sampler visits: flow_shift(1 / M), so the phases
    split the unshifted time evenly at the bottom as PCM's DDIM edges split the grid (None for one phase)."""
    return None if num_phases < 2 else float(flow_shift(1.0 / num_phases, shift))


def flow_phase_edges(num_phases: int, shift: float, num_train_timesteps: int, sigma_max: float,
                     sigma_min: float) -> torch.Tensor:
    """PCM's phase edges on a flow schedule, times sigma * T [M] ascending, 0 first: the points diffusers'
    FlowMatchEulerDiscreteScheduler(shift, shift_terminal=flow_euler_terminal(M)) visits with M inference steps, less
    the first, computed as its set_timesteps does (float64, then float32). sigma_max, sigma_min: its table's ends."""
    import numpy as np  # np.linspace, as set_timesteps uses: torch's rounds differently in the last bit

    T = num_train_timesteps
    u = torch.from_numpy(np.linspace(sigma_max * T, sigma_min * T, num_phases) / T)
    sigmas = flow_shift(u, shift)  # set_timesteps shifts again what its table already shifted (diffusers' way)
    terminal = flow_euler_terminal(num_phases, shift)
    if terminal is not None:  # stretched so that the last point before 0 is the terminal
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    visited = sigmas.float() * T
    return torch.cat([visited[1:], torch.zeros(1)]).flip(0)


def l2_loss(pred: torch.Tensor, target: torch.Tensor, huber_c: float | None = None) -> torch.Tensor:
    """Mean squared error, the L2 choice of d(., .) in LCM Algorithm 1, in float32: scalar. huber_c is ignored."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, huber_c: float) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c), iCT §3.3's pseudo-Huber applied elementwise, in float32: scalar.

    Elementwise (not on the per-sample norm as iCT writes it), like the diffusers LCM scripts, so the
    same c works at any latent size: ~ d^2 / (2c) for |d| << c, ~ |d| for |d| >> c.
    """
    if huber_c is None or not huber_c > 0:
        raise ValueError(f"huber_c must be a positive float for the huber loss, got {huber_c!r}")
    sq = (pred.float() - target.float()) ** 2
    # sqrt(d^2 + c^2) - c rewritten as d^2 / (sqrt(d^2 + c^2) + c): equal, but free of the float32
    # cancellation that rounds the loss of differences |d| << c (the converged regime) to noise.
    return torch.mean(sq / (torch.sqrt(sq + huber_c**2) + huber_c))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"l2": l2_loss, "huber": pseudo_huber_loss}


# ---------------------------------------------------------------------------------------------
# The adversarial term (PCM's "adversarial consistency loss"; optional, --adv_weight)
# ---------------------------------------------------------------------------------------------

def forward_transition(z_s: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor, alpha_u: torch.Tensor,
                       sigma_u: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_u ~ q(z_u | z_s) for a later time u (VDM §3.1): (alpha_u / alpha_s) z_s + sigma_{u|s} eps with
    sigma_{u|s}^2 = sigma_u^2 - (alpha_u / alpha_s)^2 sigma_s^2. From a clean x0 (alpha_s 1, sigma_s 0) it is
    alpha_u x0 + sigma_u eps; at u = s it is z_s. Scalings broadcast against z_s [B, ...]."""
    ratio = alpha_u / alpha_s
    return ratio * z_s + torch.sqrt((sigma_u**2 - (ratio * sigma_s) ** 2).clamp(min=0.0)) * noise


def hinge_discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake))) (GGAN), averaged over the heads' patch logits: scalar.
    0 once every real logit is >= 1 and every fake one <= -1; 2 for a discriminator that outputs 0."""
    terms = [F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean()
             for real, fake in zip(real_logits, fake_logits, strict=True)]
    return torch.stack(terms).mean()


def hinge_generator_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """mean(relu(1 - D(fake))), averaged over the heads (the generator side of PCM's adversarial consistency loss:
    it stops pushing a sample the discriminator already scores as real by the margin): scalar."""
    return torch.stack([F.relu(1.0 - fake.float()).mean() for fake in fake_logits]).mean()


# ---------------------------------------------------------------------------------------------
# Target network
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(target_params: Iterable[torch.Tensor], online_params: Iterable[torch.Tensor], decay: float,
               gate: torch.Tensor | None = None) -> None:
    """In place target <- decay * target + (1 - decay) * online (LCM Algorithm 1, theta^- update, mu = decay).

    gate: a 0/1 scalar tensor; 0 leaves the target as it is (a skipped step), decided on the device."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    targets = list(target_params)
    onlines = list(online_params)
    if len(targets) != len(onlines):
        raise ValueError(f"{len(targets)} target parameters but {len(onlines)} online parameters")
    if not targets:
        return
    # The target may be held in a lower precision (or on another device) than the online weights:
    # cast the online copy to it, since lerp needs matching dtypes.
    onlines = [o.detach().to(device=t.device, dtype=t.dtype) for t, o in zip(targets, onlines)]
    # lerp(target, online, 1 - decay) = target + (1 - decay)(online - target): exact at decay 0 and 1.
    if gate is None:
        torch._foreach_lerp_(targets, onlines, 1.0 - decay)
        return
    # _foreach_lerp_ has no tensor-weight form: it would read the gate into a Python number, a host-device wait
    # every step (scripts/sync_check.py caught it on a GPU). Tensor.lerp_ takes the weight as a device scalar.
    weight, cast = gate * (1.0 - decay), {}
    for target, online in zip(targets, onlines):
        key = (target.device, target.dtype)
        if key not in cast:
            cast[key] = weight.to(*key)
        target.lerp_(online, cast[key])
