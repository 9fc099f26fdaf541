"""The distillation objective and the student built from the teacher, on the tiny teacher."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from lcm_utils.consistency import guidance_embedding
from lcm_utils.objective import SolverSchedule, lcd_loss
from lcm_utils.teacher import build_student


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
