"""Math of lcm_utils.consistency against closed forms and diffusers' reference schedulers (offline, tiny)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from lcm_utils.consistency import (
    LOSSES,
    PREDICTION_TYPES,
    alpha_sigma,
    flow_alpha_sigma,
    append_dims,
    boundary_scalings,
    cfg_combine,
    consistency_output,
    ddim_step,
    ddim_timesteps,
    ema_update,
    guidance_embedding,
    l2_loss,
    predicted_eps,
    predicted_x0,
    pseudo_huber_loss,
    sample_timestep_pairs,
    skip_size,
)

# Stable Diffusion's own scheduler config (clip_sample False as SD ships it: otherwise DDIM clips x0).
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
T, N = 1000, 50
K = T // N
SHAPE = (3, 4, 5, 5)  # [B, C, H, W]: tiny latents


def test_schedulers_share_alphas_cumprod():
    # The trainer may read acp from whichever scheduler the teacher ships; DDPM takes no
    # set_alpha_to_one/steps_offset (they only affect inference), the betas are the same.
    betas = {k: SD_SCHEDULE[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    reference = DDIMScheduler(**SD_SCHEDULE).alphas_cumprod
    assert torch.equal(DDPMScheduler(**betas, clip_sample=False).alphas_cumprod, reference)
    assert torch.equal(LCMScheduler(**SD_SCHEDULE).alphas_cumprod, reference)


@pytest.fixture(scope="module")
def alphas_cumprod():
    return DDIMScheduler(**SD_SCHEDULE).alphas_cumprod  # the same betas as DDPM/LCMScheduler


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- timesteps

def test_ddim_timesteps_sd_grid():
    grid = ddim_timesteps(T, N)
    assert grid.dtype == torch.long and grid.shape == (N,)
    assert grid.tolist() == list(range(19, 1000, 20))
    assert skip_size(T, N) == 20
    assert ddim_timesteps(1000, 1000).tolist() == list(range(1000))
    assert ddim_timesteps(1000, 1).tolist() == [999]


@pytest.mark.parametrize("n", [0, -1, 1001, 30])
def test_skip_size_rejects_bad_grids(n):
    with pytest.raises(ValueError):
        skip_size(T, n)
    with pytest.raises(ValueError):
        ddim_timesteps(T, n)


def test_sample_timestep_pairs():
    grid = ddim_timesteps(T, N)
    start, end = sample_timestep_pairs(grid, K, 4096, torch.Generator().manual_seed(0))
    assert start.shape == end.shape == (4096,) and start.dtype == end.dtype == torch.long
    assert torch.isin(start, grid).all()
    assert torch.equal(end, (start - K).clamp(min=0))
    assert (end[start == 19] == 0).all()
    assert set(start.tolist()) == set(grid.tolist())  # covers the grid over many draws
    # Deterministic under a seed, and different under another seed.
    again, _ = sample_timestep_pairs(grid, K, 4096, torch.Generator().manual_seed(0))
    other, _ = sample_timestep_pairs(grid, K, 4096, torch.Generator().manual_seed(1))
    assert torch.equal(start, again) and not torch.equal(start, other)
    # No generator: still valid.
    start, end = sample_timestep_pairs(grid, K, 8, None)
    assert torch.isin(start, grid).all() and torch.equal(end, (start - K).clamp(min=0))


# ----------------------------------------------------------------------------- schedule

def test_append_dims():
    x = torch.arange(3.0)
    assert append_dims(x, 4).shape == (3, 1, 1, 1)
    assert append_dims(x, 1).shape == (3,)
    with pytest.raises(ValueError):
        append_dims(torch.zeros(2, 2), 1)


def test_alpha_sigma(alphas_cumprod):
    t = torch.tensor([0, 19, 999])
    alpha, sigma = alpha_sigma(alphas_cumprod.half(), t, 4)  # float32 out even from a half schedule
    assert alpha.shape == sigma.shape == (3, 1, 1, 1) and alpha.dtype == torch.float32
    torch.testing.assert_close(alpha.flatten(), alphas_cumprod[t].sqrt(), rtol=1e-3, atol=0)
    alpha, sigma = alpha_sigma(alphas_cumprod, t, 4)
    torch.testing.assert_close(alpha.flatten(), alphas_cumprod[t].sqrt())
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))


@pytest.mark.parametrize("timestep_scaling", [10.0, 1.0])
def test_boundary_scalings_match_lcm_scheduler(timestep_scaling):
    scheduler = LCMScheduler(**SD_SCHEDULE, timestep_scaling=timestep_scaling)
    t = torch.tensor([0, 1, 19, 20, 259, 999])
    c_skip, c_out = boundary_scalings(t, timestep_scaling=timestep_scaling)
    assert c_skip.shape == c_out.shape == (len(t),) and c_skip.dtype == torch.float32
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(ref_skip, rel=1e-6, abs=1e-12)
        assert c_out[i].item() == pytest.approx(ref_out, rel=1e-6, abs=1e-12)


def test_boundary_condition_identity_at_zero():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 0]))
    assert c_skip.tolist() == [1.0, 1.0] and c_out.tolist() == [0.0, 0.0]
    z, x0 = randn(2, 4, 3, 3, seed=1), randn(2, 4, 3, 3, seed=2)
    assert torch.equal(consistency_output(z, x0, c_skip, c_out), z)


def test_consistency_output_closed_form():
    z, x0 = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    c_skip, c_out = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.9, 0.5, 0.2])
    expected = c_skip[:, None, None, None] * z + c_out[:, None, None, None] * x0
    torch.testing.assert_close(consistency_output(z, x0, c_skip, c_out), expected)
    assert consistency_output(z.half(), x0.half(), c_skip, c_out).dtype == torch.float16


# ----------------------------------------------------------------------------- prediction types

def model_output_for(prediction_type, x0, eps, alpha, sigma):
    """What an ideal model of each type outputs for z = alpha x0 + sigma eps."""
    return {
        "epsilon": eps,
        "v_prediction": alpha * eps - sigma * x0,
        "sample": x0,
        "flow": eps - x0,  # the velocity of z = (1 - sigma) x0 + sigma eps
    }[prediction_type]


@pytest.mark.parametrize("prediction_type", sorted(PREDICTION_TYPES))
def test_prediction_type_round_trips(prediction_type, alphas_cumprod):
    assert set(PREDICTION_TYPES) == {"epsilon", "v_prediction", "sample", "flow"}
    x0, eps = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    if prediction_type == "flow":  # exact on a flow schedule only, alpha = 1 - sigma
        alpha, sigma = flow_alpha_sigma(torch.tensor([0.0, 500.0, 1000.0]), 1000, len(SHAPE))
    else:
        alpha, sigma = alpha_sigma(alphas_cumprod, torch.tensor([0, 499, 999]), len(SHAPE))
    z = alpha * x0 + sigma * eps
    out = model_output_for(prediction_type, x0, eps, alpha, sigma)
    torch.testing.assert_close(predicted_x0(out, z, alpha, sigma, prediction_type), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predicted_eps(out, z, alpha, sigma, prediction_type), eps, atol=1e-5, rtol=1e-5)


def test_prediction_type_half_latents(alphas_cumprod):
    # float32 alphas are cast to the latents' dtype where used.
    alpha, sigma = alpha_sigma(alphas_cumprod, torch.tensor([19, 499, 999]), len(SHAPE))
    z, out = randn(*SHAPE, seed=1).half(), randn(*SHAPE, seed=2).half()
    for prediction_type in PREDICTION_TYPES:
        assert predicted_x0(out, z, alpha, sigma, prediction_type).dtype == torch.float16
        assert predicted_eps(out, z, alpha, sigma, prediction_type).dtype == torch.float16


def test_unknown_prediction_type_names_valid_ones():
    x = torch.zeros(1, 1)
    for fn in (predicted_x0, predicted_eps):
        with pytest.raises(ValueError, match="epsilon.*sample.*v_prediction"):
            fn(x, x, x, x, "velocity")


# ----------------------------------------------------------------------------- DDIM step

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("s", [19, 39, 499, 999])
def test_ddim_step_matches_ddim_scheduler(prediction_type, s, alphas_cumprod):
    scheduler = DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    scheduler.set_timesteps(N)  # step() jumps T // N = K from s, to acp[0] (final_alpha_cumprod) below 0
    z_s, out = randn(*SHAPE, seed=s), randn(*SHAPE, seed=s + 1)
    start = torch.full((SHAPE[0],), s)
    _, end = sample_timestep_pairs(torch.tensor([s]), K, SHAPE[0], None)
    assert end.tolist() == [max(s - K, 0)] * SHAPE[0]
    alpha, sigma = alpha_sigma(alphas_cumprod, start, z_s.ndim)
    x0 = predicted_x0(out, z_s, alpha, sigma, prediction_type)
    eps = predicted_eps(out, z_s, alpha, sigma, prediction_type)
    expected = scheduler.step(out, s, z_s, eta=0.0).prev_sample
    torch.testing.assert_close(ddim_step(x0, eps, alphas_cumprod, end), expected, atol=1e-5, rtol=1e-5)


def test_ddim_step_per_sample_ends(alphas_cumprod):
    x0, eps = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    end = torch.tensor([0, 479, 979])
    expected = torch.stack(
        [alphas_cumprod[t].sqrt() * x0[i] + (1 - alphas_cumprod[t]).sqrt() * eps[i] for i, t in enumerate(end)]
    )
    torch.testing.assert_close(ddim_step(x0, eps, alphas_cumprod, end), expected)
    assert ddim_step(x0.half(), eps.half(), alphas_cumprod, end).dtype == torch.float16


# ----------------------------------------------------------------------------- guidance

def test_cfg_combine():
    cond, uncond = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    assert torch.equal(cfg_combine(cond, uncond, torch.zeros(SHAPE[0])), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, torch.ones(SHAPE[0])), 2 * cond - uncond)
    w = torch.tensor([0.0, 1.0, 7.5])
    expected = torch.stack([(1 + wi) * cond[i] - wi * uncond[i] for i, wi in enumerate(w.tolist())])
    torch.testing.assert_close(cfg_combine(cond, uncond, w), expected)
    torch.testing.assert_close(cfg_combine(cond, uncond, 3.0), 4 * cond - 3 * uncond)
    assert cfg_combine(cond.half(), uncond.half(), w).dtype == torch.float16


@pytest.mark.parametrize("embedding_dim", [256, 33])
def test_guidance_embedding_matches_lcm_pipeline(embedding_dim):
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline,
    )

    # The pipeline's method uses only its arguments and multiplies w by 1000 itself, so call it unbound.
    reference = LatentConsistencyModelPipeline.get_guidance_scale_embedding
    w = torch.tensor([0.0, 1.0, 6.5, 13.0])  # guidance_scale - 1, as the pipeline passes it
    emb = guidance_embedding(w, embedding_dim)
    assert emb.shape == (len(w), embedding_dim) and emb.dtype == torch.float32
    assert torch.equal(emb, reference(None, w, embedding_dim=embedding_dim))
    if embedding_dim % 2:
        assert (emb[:, -1] == 0).all()
    for dtype in (torch.float16, torch.float64):
        assert torch.equal(guidance_embedding(w, embedding_dim, dtype), reference(None, w, embedding_dim, dtype))
    # w = 0: sin half 0, cos half 1.
    half = embedding_dim // 2
    assert (emb[0, :half] == 0).all() and (emb[0, half : 2 * half] == 1).all()


# ----------------------------------------------------------------------------- losses

def test_loss_registry():
    assert LOSSES == {"l2": l2_loss, "huber": pseudo_huber_loss}


def test_l2_loss_is_mse():
    pred, target = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    for fn in (l2_loss, LOSSES["l2"]):
        torch.testing.assert_close(fn(pred, target, None), F.mse_loss(pred, target))
        torch.testing.assert_close(fn(pred, target, 0.001), F.mse_loss(pred, target))
    loss = l2_loss(pred.half(), target.half())
    assert loss.dtype == torch.float32 and loss.ndim == 0


def test_pseudo_huber_loss():
    pred, target = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    c = 0.001
    expected = ((pred.double() - target.double()) ** 2 + c**2).sqrt().sub(c).mean().float()
    torch.testing.assert_close(LOSSES["huber"](pred, target, c), expected)
    loss = pseudo_huber_loss(pred.half(), target.half(), c)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    # Elementwise, not on a per-sample norm: a single differing element costs (sqrt(d^2+c^2)-c)/numel.
    one = torch.zeros(SHAPE)
    one[0, 0, 0, 0] = 2.0
    torch.testing.assert_close(
        pseudo_huber_loss(one, torch.zeros(SHAPE), 1.0), torch.tensor((5**0.5 - 1) / one.numel())
    )
    with pytest.raises(ValueError):
        pseudo_huber_loss(pred, target, None)


def test_pseudo_huber_limits():
    c = 1.0
    small = torch.full((4,), 1e-3)
    # |d| << c: ~ d^2 / (2c), and still accurate in float32 (no sqrt(d^2 + c^2) - c cancellation).
    torch.testing.assert_close(
        pseudo_huber_loss(small, torch.zeros(4), c), l2_loss(small, torch.zeros(4)) / (2 * c), rtol=1e-5, atol=0
    )
    large = torch.tensor([1e4, -1e4, 1e4, -1e4])
    torch.testing.assert_close(pseudo_huber_loss(large, torch.zeros(4), c), large.abs().mean(), rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- EMA

def params(seed, dtype=torch.float32):
    return [randn(3, 2, seed=seed, dtype=dtype), randn(5, seed=seed + 1, dtype=dtype)]


def test_ema_update_closed_forms():
    online = params(10)
    target = params(0)
    ema_update(target, online, 0.0)
    assert all(torch.equal(t, o) for t, o in zip(target, online))

    target, before = params(0), params(0)
    ema_update(target, online, 1.0)
    assert all(torch.equal(t, b) for t, b in zip(target, before))

    target = params(0)
    ema_update(iter(target), iter(online), 0.95)  # any iterables, e.g. module.parameters()
    for t, b, o in zip(target, before, online):
        torch.testing.assert_close(t, 0.95 * b + 0.05 * o)


def test_ema_update_on_module_parameters():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * t.detach() + 0.1 * o.detach() for t, o in zip(target.parameters(), online.parameters())]
    ema_update(target.parameters(), online.parameters(), 0.9)
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t.detach(), e)
        assert t.requires_grad  # still a trainable leaf, just updated in place


def test_ema_update_half_target_float_online():
    online = params(10)
    target = params(0, torch.float16)
    before = [t.clone() for t in target]
    ema_update(target, online, 0.95)
    for t, b, o in zip(target, before, online):
        assert t.dtype == torch.float16
        torch.testing.assert_close(t, (0.95 * b.float() + 0.05 * o).half(), atol=2e-3, rtol=2e-3)


def test_ema_update_gate_is_decided_on_the_device():
    """Gate 1 is the plain update bit for bit, gate 0 leaves the target as it was, mixed dtypes included; and the
    gate is never read on the host: on the meta device (no values to read) the update still runs."""
    online = params(10) + [randn(4, seed=30, dtype=torch.float16)]
    plain, gated, closed = (params(0) + [randn(4, seed=20, dtype=torch.float16)] for _ in range(3))
    ema_update(plain, online, 0.9)
    ema_update(gated, online, 0.9, gate=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(gated[:2], plain[:2]))
    torch.testing.assert_close(gated[2], plain[2], atol=1e-3, rtol=0)  # fp16: the weight's own rounding
    before = [t.clone() for t in closed]
    ema_update(closed, online, 0.9, gate=torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(closed, before))
    meta = [torch.empty(3, device="meta"), torch.empty(2, device="meta", dtype=torch.float16)]
    ema_update(meta, [torch.empty_like(t) for t in meta], 0.9, gate=torch.ones((), device="meta"))


def test_ema_update_rejects_mismatch():
    with pytest.raises(ValueError):
        ema_update(params(0), params(0)[:1], 0.9)
    with pytest.raises(ValueError):
        ema_update(params(0), params(1), 1.5)
