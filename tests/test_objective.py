"""The distillation objective and the student built from the teacher, on the tiny teacher."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from lcm_utils.consistency import guidance_embedding
from lcm_utils.families import StableDiffusion
from lcm_utils.objectives import SolverSchedule, lcd_loss

build_student = StableDiffusion.build_student


@pytest.fixture(scope="module")
def teacher_unet(assets):
    return UNet2DConditionModel.from_pretrained(assets["teacher_eps"], subfolder="unet").eval()


@pytest.fixture(scope="module")
def schedule(assets):
    scheduler = DDPMScheduler.from_pretrained(assets["teacher_eps"], subfolder="scheduler")
    return SolverSchedule.from_scheduler(scheduler, 50, 10.0, "cpu")


def inputs(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, 8, 8, generator=g)
    c = torch.randn(batch, 77, 32, generator=g)
    return z, c


def test_initial_student_equals_teacher(teacher_unet):
    student = build_student(teacher_unet, 256).eval()
    assert student.config.time_cond_proj_dim == 256
    z, c = inputs()
    t = torch.tensor([999, 500, 19])
    w = torch.tensor([0.0, 5.0, 15.0])
    with torch.no_grad():
        expected = teacher_unet(z, t, encoder_hidden_states=c).sample
        got = student(z, t, encoder_hidden_states=c, timestep_cond=guidance_embedding(w, 256)).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_student_of_an_in_memory_teacher_gets_the_w_embedding(teacher_unet):
    # A UNet built in code (not loaded) carries diffusers' record of defaulted keys; the student must still get
    # its cond_proj (it once silently came out without one).
    built = UNet2DConditionModel(**{k: v for k, v in teacher_unet.config.items() if not k.startswith("_")})
    student = build_student(built, 256)
    assert student.time_embedding.cond_proj is not None
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0


def test_one_batched_teacher_forward_and_gradients_only_to_student(teacher_unet, schedule):
    student = build_student(teacher_unet, 256)
    target = build_student(teacher_unet, 256).requires_grad_(False)
    calls = []

    def teacher(z, t, cond):
        calls.append(z.shape[0])
        return teacher_unet(z, t, **cond).sample

    def with_w(unet):
        return lambda z, t, cond, w: unet(z, t, timestep_cond=guidance_embedding(w, 256), **cond).sample

    z0, c = inputs(batch=2)
    u = torch.zeros(1, 77, 32)
    w = torch.tensor([5.0, 10.0])
    loss = lcd_loss(z0, {"encoder_hidden_states": c}, {"encoder_hidden_states": u}, w, with_w(student), teacher,
                    with_w(target), schedule, "l2", None, torch.Generator().manual_seed(0))
    loss.backward()
    assert calls == [4]  # cond and uncond in ONE forward of 2B
    assert loss.item() > 0
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher_unet.parameters())


def test_loss_with_an_oracle_matches_closed_form(schedule):
    """A model that always predicts the clean latent z0 keeps the teacher's DDIM step on the true trajectory,
    so the loss reduces to the distance between the boundary-scaled ends: a closed form."""
    from lcm_utils.consistency import boundary_scalings, sample_timestep_pairs

    z0, c = inputs(batch=4)

    def oracle(z, t, cond, w=None):
        z_ref = z0.repeat(z.shape[0] // z0.shape[0], 1, 1, 1)
        alpha = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        return (z - alpha * z_ref) / sigma  # the exact epsilon

    cond, uncond = {"encoder_hidden_states": c}, {"encoder_hidden_states": torch.zeros(1, 77, 32)}
    loss = lcd_loss(z0, cond, uncond, torch.tensor([3.0, 7.0, 0.0, 1.0]), oracle, oracle, oracle, schedule,
                    "l2", None, torch.Generator().manual_seed(1))

    g = torch.Generator().manual_seed(1)  # replay the same draws
    start, end = sample_timestep_pairs(schedule.grid, schedule.k, 4, g)
    noise = torch.randn(z0.shape, generator=g)
    acp = schedule.alphas_cumprod.view(-1, 1, 1, 1)
    z_s = acp[start].sqrt() * z0 + (1 - acp[start]).sqrt() * noise
    z_t = acp[end].sqrt() * z0 + (1 - acp[end]).sqrt() * noise
    (skip_s, out_s), (skip_t, out_t) = boundary_scalings(start), boundary_scalings(end)
    v = lambda x: x.view(-1, 1, 1, 1)  # noqa: E731
    expected = ((v(skip_s) * z_s + v(out_s) * z0 - v(skip_t) * z_t - v(out_t) * z0) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)


SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcd_loss_matches_a_reference_built_on_diffusers_schedulers(prediction_type):
    """Algorithm 1 recomputed independently: CFG on the raw outputs, the teacher's step by DDIMScheduler.step
    (eta 0), the boundary scalings by LCMScheduler; the networks depend on t, the condition and w."""
    from diffusers import DDIMScheduler, LCMScheduler

    ddim = DDIMScheduler(prediction_type=prediction_type, **SD_SCHEDULE)
    ddim.set_timesteps(50)
    lcm = LCMScheduler(prediction_type=prediction_type, timestep_scaling=10.0, **SD_SCHEDULE)
    schedule = SolverSchedule.from_scheduler(ddim, 50, 10.0, "cpu")
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(3, 5, 4, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(1, 5, 4, generator=g)}
    w = torch.tensor([2.0, 7.5, 14.0])

    def offset(c):  # a condition-dependent shift per channel, [B, 4, 1, 1]
        return c["encoder_hidden_states"].mean(1)[:, :, None, None]

    def teacher(z, t, c):
        return 0.6 * z + offset(c) * (t.float() / 1000)[:, None, None, None]

    def student(z, t, c, w):
        return 0.4 * z + 0.1 * offset(c) * w[:, None, None, None]

    def target(z, t, c, w):
        return 0.5 * z - 0.2 * offset(c) * w[:, None, None, None] + 0.01 * (t.float() / 1000)[:, None, None, None]

    loss = lcd_loss(z0, cond, uncond, w, student, teacher, target, schedule, "l2", None,
                    torch.Generator().manual_seed(3))

    r = torch.Generator().manual_seed(3)  # replay the draws
    start, end = sample_timestep_pairs_ref(schedule, 3, r)
    noise = torch.randn(z0.shape, generator=r)
    acp = ddim.alphas_cumprod
    a = lambda t: acp[t].sqrt()[:, None, None, None]  # noqa: E731
    s_ = lambda t: (1 - acp[t]).sqrt()[:, None, None, None]  # noqa: E731
    z_s = a(start) * z0 + s_(start) * noise
    u = {"encoder_hidden_states": uncond["encoder_hidden_states"].expand(3, -1, -1)}
    out_c, out_u = teacher(z_s, start, cond), teacher(z_s, start, u)
    guided = out_c + w[:, None, None, None] * (out_c - out_u)
    z_t = torch.cat([ddim.step(guided[i:i + 1], int(start[i]), z_s[i:i + 1], eta=0.0).prev_sample for i in range(3)])
    assert torch.equal(end, (start - 20).clamp(min=0))

    def x0(out, z, t):
        return (z - s_(t) * out) / a(t) if prediction_type == "epsilon" else a(t) * z - s_(t) * out

    def f(out, z, t):
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        return c_skip[:, None, None, None] * z + c_out[:, None, None, None] * x0(out, z, t)

    expected = ((f(student(z_s, start, cond, w), z_s, start) - f(target(z_t, end, cond, w), z_t, end)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)


def sample_timestep_pairs_ref(schedule, batch, generator):
    from lcm_utils.consistency import sample_timestep_pairs

    return sample_timestep_pairs(schedule.grid, schedule.k, batch, generator)
