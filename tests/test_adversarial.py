"""The adversarial term (--adv_weight): its math against closed forms, the discriminator's taps on every family's
denoiser, where its gradients go, and the scripts with it (resume exact, LoRA export, two processes, engines)."""

import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_args, check_ok, launch, straight_and_resumed
from lcm_utils.adversarial import HEADS_FILE, Adversary
from lcm_utils.consistency import forward_transition, hinge_discriminator_loss, hinge_generator_loss
from lcm_utils.objectives import LCM, PCM, ConsistencyPair, FlowSchedule, SolverSchedule

ADV = dict(adv_weight=0.5, adv_lr=1e-3)


def test_hinge_losses_against_closed_forms():
    real = [torch.tensor([2.0, 0.5, -1.0]), torch.tensor([[0.0]])]
    fake = [torch.tensor([-2.0, 0.0, 3.0]), torch.tensor([[-0.5]])]
    # head 1: relu(1 - real) = (0, .5, 2), relu(1 + fake) = (0, 1, 4); head 2: 1 and .5
    expected = ((2.5 / 3 + 5 / 3) + (1.0 + 0.5)) / 2
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(expected)
    assert hinge_generator_loss(fake).item() == pytest.approx(((3 + 1 + 0) / 3 + 1.5) / 2)
    assert hinge_discriminator_loss([torch.zeros(4)], [torch.zeros(4)]).item() == 2.0  # D outputs 0
    assert hinge_discriminator_loss([torch.full((4,), 1.5)], [torch.full((4,), -1.0)]).item() == 0.0


def test_forward_transition_keeps_the_marginals():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, generator=g).expand(4, 200_000)
    a, b = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    alpha_s, sigma_s, alpha_u, sigma_u = torch.tensor(0.9), torch.tensor(0.6 ** 0.5 * 0.5 ** 0.5), \
        torch.tensor(0.5), torch.tensor(0.75 ** 0.5)
    z_u = forward_transition(alpha_s * x0 + sigma_s * a, alpha_s, sigma_s, alpha_u, sigma_u, b)
    # z_u - alpha_u x0 is noise of variance sigma_u^2, whatever the variance it had at s
    residual = z_u - alpha_u * x0
    assert residual.var().item() == pytest.approx(sigma_u.item() ** 2, rel=0.01)
    assert residual.mean().abs().item() < 0.01
    same = forward_transition(x0, alpha_s, sigma_s, alpha_s, sigma_s, b)  # u = s: nothing added
    torch.testing.assert_close(same, x0)
    clean = forward_transition(x0, torch.tensor(1.0), torch.tensor(0.0), alpha_u, sigma_u, b)
    torch.testing.assert_close(clean, alpha_u * x0 + sigma_u * b)


def ddpm_schedule():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return SolverSchedule.from_scheduler(scheduler, 50, 10.0, torch.device("cpu"))


def flow_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 50, 10.0, torch.device("cpu"))


@pytest.mark.parametrize("make_schedule", [ddpm_schedule, flow_schedule])
def test_adversarial_times_lie_inside_the_phase(make_schedule):
    """PCM noises to a time inside the pair's phase, [edge, next edge) (the grid's top for the last phase); LCM
    anywhere from the origin up."""
    schedule, g = make_schedule(), torch.Generator().manual_seed(0)
    start, _ = schedule.intervals(512, g)
    pcm = PCM(4)
    edges = schedule.phase_edges(4)
    point = pcm.target_points(start, None, schedule, g)
    low, high = pcm.adversarial_span(start, point, schedule)
    upper = torch.cat([edges[1:], schedule.grid[-1:]])
    assert torch.equal(low, point)
    assert torch.equal(high, upper[torch.searchsorted(edges, point, right=True) - 1])
    assert (start <= high).all() and (start > low).all()  # the start's own phase
    u = schedule.draw_times(low, high, g)
    assert (u >= low).all() and (u < high).all() and u.dtype == start.dtype
    assert len(torch.unique(u)) > 50
    # --adv_timesteps low: u = low + (high - low) r^3 stays in the span, its mean at a quarter of it (uniform: half)
    position = {power: ((schedule.draw_times(low, high, g, power) - low).double() / (high - low).double()).mean()
                for power in (1.0, 3.0)}
    assert position[1.0] == pytest.approx(0.5, abs=0.05) and position[3.0] == pytest.approx(0.25, abs=0.05)
    skewed = schedule.draw_times(low, high, g, 3.0)
    assert (skewed >= low).all() and (skewed < high).all() and skewed.dtype == start.dtype
    low, high = LCM().adversarial_span(start, None, schedule)
    assert (low == 0).all() and (high == schedule.grid[-1]).all()


def taps_and_run(family_cls, teacher_dir, subfolder, z_shape, cond):
    denoiser = family_cls.load_denoiser(teacher_dir, {}).eval()
    calls = []

    def call(z, t, c):
        calls.append(1)
        return family_cls.denoise(denoiser, z, t, c)

    adversary = Adversary(call, family_cls.discriminator_taps(denoiser), 0.1, "target", 1e-4, 0.0,
                          torch.device("cpu"), seed=0)
    z = torch.randn(z_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500] * z_shape[0])
    features = adversary.features(z, t, cond)
    with torch.no_grad():
        family_cls.denoise(denoiser, z, t, cond)  # an ordinary pass: nothing captured
    return denoiser, adversary, features


def test_taps_follow_every_familys_blocks(assets, sdxl_assets, sd3_assets):
    """One head per UNet down, middle and up block, or per MMDiT joint block, its width read from the config:
    the tiny teachers have other widths than the real ones, so none can be hard-coded."""
    from lcm_utils.families import StableDiffusion, StableDiffusion3, StableDiffusionXL

    g = torch.Generator().manual_seed(1)
    sd_cond = {"encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}
    unet, adversary, features = taps_and_run(StableDiffusion, assets["teacher_eps"], "unet", (2, 4, 8, 8), sd_cond)
    widths = list(unet.config.block_out_channels)
    assert [f.shape[1] for f in features] == widths + widths[-1:] + widths[::-1]
    assert features[-1].shape[-2:] == (8, 8) and all(8 % f.shape[-1] == 0 for f in features)  # the up path's end
    assert [tuple(x.shape) for x in adversary.logits(features)] == [(2, 1) + tuple(f.shape[-2:]) for f in features]

    xl = sdxl_assets["sdxl"]
    config = StableDiffusionXL.denoiser_class().load_config(xl, subfolder="unet")
    xl_cond = {"encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], generator=g),
               "added_cond_kwargs": {"text_embeds": torch.randn(2, config["projection_class_embeddings_input_dim"]
                                                                - 6 * config["addition_time_embed_dim"], generator=g),
                                     "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}}
    unet, adversary, features = taps_and_run(StableDiffusionXL, xl, "unet", (2, 4, 8, 8), xl_cond)
    widths = list(unet.config.block_out_channels)
    assert [f.shape[1] for f in features] == widths + widths[-1:] + widths[::-1]

    for name in ("sd3", "sd3_no_t5"):
        config = StableDiffusion3.denoiser_class().load_config(sd3_assets[name], subfolder="transformer")
        sd3_cond = {"encoder_hidden_states": torch.randn(2, 10, config["joint_attention_dim"], generator=g),
                    "pooled_projections": torch.randn(2, config["pooled_projection_dim"], generator=g)}
        mmdit, adversary, features = taps_and_run(StableDiffusion3, sd3_assets[name], "transformer",
                                                  (2, config["in_channels"], 8, 8), sd3_cond)
        width = config["num_attention_heads"] * config["attention_head_dim"]
        side = 8 // config["patch_size"]
        assert [tuple(f.shape) for f in features] == [(2, width, side, side)] * config["num_layers"]
        # the map is the tokens in raster order: token (row r, column c) is at [r, c]
        tokens = torch.randn(2, side * side, width, generator=g)
        from lcm_utils.families.sd3 import _token_map

        grid = _token_map((None, tokens), (2, 16, 8, 8), config["patch_size"])
        torch.testing.assert_close(grid[:, :, 1, 2], tokens[:, side + 2])


def test_the_generator_term_reaches_the_student_only_and_the_heads_learn_from_their_own(assets):
    from lcm_utils.families import StableDiffusion

    g = torch.Generator().manual_seed(2)
    cond = {"encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}
    unet, adversary, _ = taps_and_run(StableDiffusion, assets["teacher_eps"], "unet", (2, 4, 8, 8), cond)
    unet.requires_grad_(False)
    schedule = ddpm_schedule()
    student_out = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)  # stands for the student's output
    pair = ConsistencyPair(student_out * 1.0, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 519]),
                           torch.tensor([759, 499]))
    heads_before = [p.detach().clone() for p in adversary.heads.parameters()]
    g_term, d_loss = adversary.terms(pair, torch.randn(2, 4, 8, 8, generator=g), cond, schedule, PCM(4), g)
    g_term.backward()
    assert student_out.grad is not None and student_out.grad.abs().sum() > 0
    assert all(p.grad is None for p in adversary.heads.parameters())  # the generator's term leaves the heads
    assert all(p.grad is None for p in unet.parameters())  # and the frozen backbone
    student_out.grad = None
    adversary.backward(d_loss)
    assert student_out.grad is None  # the heads' loss sees the fake detached
    assert all(p.grad is not None for p in adversary.heads.parameters())
    adversary.step(max_grad_norm=1.0)
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, adversary.heads.parameters()))
    numbers = adversary.look()
    assert numbers["adv/d_loss"] == pytest.approx(d_loss.item())
    assert numbers["adv/g_loss"] == pytest.approx(g_term.item() / 0.1)
    assert adversary.look() == {}  # reset at every look

    # --adv_fake x0: the fake is the student's clean estimate (real: the data), so the term's gradient reaches the
    # student through its x0 and not through the phase-edge prediction
    x0_out = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    student_out.grad = None
    pair = ConsistencyPair(student_out * 1.0, pair.target, pair.start, pair.point, lambda: x0_out * 1.0)
    adversary.fake, adversary.real = "x0", "data"
    g_term, _ = adversary.terms(pair, torch.randn(2, 4, 8, 8, generator=g), cond, schedule, PCM(4), g)
    g_term.backward()
    assert student_out.grad is None and x0_out.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x0 with real 'data'"):
        Adversary(lambda *a: None, [], 0.1, "target", 1e-4, 0.0, torch.device("cpu"), seed=0, fake="x0")


def test_the_pair_carries_the_students_clean_estimate():
    """student_x0() is the x0 read from the student's output at the start: with boundary scalings c_skip = 0 and
    c_out = 1 (a huge timestep scaling) LCM's prediction is that same x0."""
    from diffusers import DDPMScheduler

    from lcm_utils.objectives import consistency_pair

    schedule = SolverSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear"), 50, 1e9,
                                             torch.device("cpu"))
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def net(z, t, cond, w):  # any function of its input will do
        return torch.einsum("bchw,cd->bdhw", z, weight) + 0.1 * cond

    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.ones(3, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    pair = consistency_pair(z0, cond, uncond, torch.full((3,), 5.0), net, lambda z, t, c: net(z, t, c, None), net,
                            schedule, g)
    torch.testing.assert_close(pair.student_x0(), pair.pred.float(), atol=1e-5, rtol=1e-5)


def heads(folder):
    return load_file(os.path.join(folder, HEADS_FILE))


@pytest.mark.parametrize("script,flags", [
    ("train_lcm_distill.py", dict(objective="pcm", adv_real="data", adv_timesteps="low", adv_fake="x0")),
    ("train_lcm_lora.py", dict(lora_rank=4, lora_alpha=8, ema_decay=0.9, gradient_accumulation_steps=2,
                               mixed_precision="bf16")),
])
def test_resume_with_the_term_is_exact(assets, tmp_path, script, flags):
    """The heads and their optimizer are in the checkpoint: a run killed after step 2 and resumed ends bit-equal,
    student and discriminator alike (the LoRA run in bf16, its base cast, with gradient accumulation)."""
    common = dict(ADV, max_train_steps=4, checkpointing_steps=2, **flags)
    straight, resumed = straight_and_resumed(script, lambda out: base_args(assets, out, **common), tmp_path)
    a, b = (os.path.join(run, "checkpoint-4") for run in (straight, resumed))
    assert all(torch.equal(heads(a)[k], heads(b)[k]) for k in heads(a))
    assert any(not torch.equal(heads(a)[k], heads(os.path.join(straight, "checkpoint-2"))[k]) for k in heads(a))
    student = "unet" if script == "train_lcm_distill.py" else "lora.safetensors"
    if student == "unet":
        x, y = (load_file(os.path.join(c, "unet", "diffusion_pytorch_model.safetensors")) for c in (a, b))
    else:
        x, y = (load_file(os.path.join(c, student)) for c in (a, b))
    assert all(torch.equal(x[k], y[k]) for k in x)
    if student == "lora.safetensors":  # the export is a plain LoRA: the stock pipeline loads and fuses it
        check_lora_loads_and_fuses(assets, straight)


def check_lora_loads_and_fuses(assets, out):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(assets["teacher_eps"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(out)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        unfused = pipe.unet(z, torch.tensor([499]), **cond).sample
        pipe.fuse_lora()
        torch.testing.assert_close(pipe.unet(z, torch.tensor([499]), **cond).sample, unfused, rtol=0, atol=1e-4)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red square", num_inference_steps=2, guidance_scale=1.0, height=16, width=16,
                 output_type="np").images[0]
    assert image.shape == (16, 16, 3) and (image == image).all()


def test_the_term_changes_training_and_turns_on_at_a_resume(assets, tmp_path):
    """With the term the student differs from a run without it (its gradient arrives); a checkpoint written
    without the term resumes with it, the heads starting fresh, and says so."""
    plain, adv = str(tmp_path / "plain"), str(tmp_path / "adv")
    check_ok(launch("train_lcm_distill.py", base_args(assets, plain, max_train_steps=2, checkpointing_steps=2)))
    result = launch("train_lcm_distill.py", base_args(assets, adv, max_train_steps=2, logging_steps=1, **ADV))
    check_ok(result)
    assert "an adversarial term (weight 0.5, real: target, fake: prediction, times: uniform)" in result.stdout
    assert "d_loss=" in result.stdout + result.stderr
    x, y = (load_file(os.path.join(run, "unet", "diffusion_pytorch_model.safetensors")) for run in (plain, adv))
    assert any(not torch.equal(x[k], y[k]) for k in x)
    assert not os.path.exists(os.path.join(plain, "checkpoint-2", HEADS_FILE))
    assert "plus an adversarial term of weight 0.5" in open(os.path.join(adv, "README.md")).read()
    assert "adversarial" not in open(os.path.join(plain, "README.md")).read()
    result = launch("train_lcm_distill.py", base_args(assets, plain, max_train_steps=3, checkpointing_steps=3,
                                                      resume_from_checkpoint="latest", **ADV))
    check_ok(result)
    assert "has no discriminator (written without --adv_weight): its heads start fresh" in result.stdout
    assert os.path.isfile(os.path.join(plain, "checkpoint-3", HEADS_FILE))


def _step_on_rank(rank, init_file, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        adversary = toy_adversary(num_processes=2)
        for i, p in enumerate(adversary.heads.parameters()):  # each rank its own gradients
            p.grad = torch.full_like(p, float(rank + 1) * (i + 1))
        adversary.step(max_grad_norm=0.0)
        results[rank] = [p.detach().clone() for p in adversary.heads.parameters()]
    finally:
        torch.distributed.destroy_process_group()


def toy_adversary(num_processes=1):
    from lcm_utils.adversarial import Tap

    block = torch.nn.Conv2d(4, 8, 1)
    return Adversary(lambda z, t, c: block(z), [Tap(block, 8, 3, lambda output, shape: output)], 0.1, "target",
                     1e-2, 0.0, torch.device("cpu"), seed=3, num_processes=num_processes)


def test_processes_step_one_discriminator(tmp_path):
    """Every process builds the same heads from the seed and steps them with the gradients averaged over the
    processes (the heads stay out of DDP, FSDP and DeepSpeed): two ranks with different gradients end equal, and
    equal to one process stepping with the mean."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_step_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    single = toy_adversary()
    for i, p in enumerate(single.heads.parameters()):
        p.grad = torch.full_like(p, 1.5 * (i + 1))
    single.step(max_grad_norm=0.0)
    for a, b, c in zip(results[0], results[1], single.heads.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("script,engine,flags", [
    ("train_lcm_lora.py", "configs/accelerate_fsdp.yaml", dict(lora_rank=4, lora_alpha=8)),
    ("train_lcm_distill.py", "configs/accelerate_deepspeed_zero2.yaml", dict(objective="pcm")),
])
def test_engines_train_the_term_as_ddp_does(assets, tmp_path, script, engine, flags):
    """FSDP (the LoRA base sharded, the fake's gradient through it) and ZeRO-2 (the student in DeepSpeed's engine)
    end where DDP ends, discriminator included: the heads never enter the engine."""
    # A large Adam epsilon: the heads' AdamW has no first moment, so at its second step a weight whose first
    # gradient was about zero takes lr-sized steps on a tiny second one; FSDP's last-digit differences in the student
    # (5e-7) then moved one head weight by 0.57 lr at epsilon 1e-4. A head outside the engine's averaging
    # would still differ by far more than the bound below.
    common = dict(ADV, max_train_steps=2, checkpointing_steps=2, adam_epsilon=1e-2, **flags)
    runs = {name: str(tmp_path / name) for name in ("ddp", "engine")}
    check_ok(launch(script, base_args(assets, runs["ddp"], **common), num_processes=2))
    check_ok(launch(script, base_args(assets, runs["engine"], **common), num_processes=2, engine=engine))
    a, b = (heads(os.path.join(run, "checkpoint-2")) for run in runs.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    if script == "train_lcm_lora.py":
        x, y = (load_file(os.path.join(run, "pytorch_lora_weights.safetensors")) for run in runs.values())
    else:
        x, y = (load_file(os.path.join(run, "unet", "diffusion_pytorch_model.safetensors")) for run in runs.values())
    assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-6


def test_a_non_finite_discriminator_loss_skips_the_whole_step(assets, tmp_path, monkeypatch, capsys):
    """The non-finite guard covers the heads' loss too: a NaN there (step 2) leaves the student, its EMA target and
    the heads as they were, and is counted and said as a skipped update."""
    import lcm_utils.adversarial as adversarial
    from test_interrupts import run_in_process

    real_loss, calls = adversarial.hinge_discriminator_loss, []

    def poisoned(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(adversarial, "hinge_discriminator_loss", poisoned)
    out = str(tmp_path / "out")
    assert run_in_process(base_args(assets, out, max_train_steps=3, checkpointing_steps=1, logging_steps=1,
                                    **ADV)) == 0
    assert "step 2: 1 non-finite loss, update skipped (1 in a row now)" in capsys.readouterr().out
    checkpoint = {n: os.path.join(out, f"checkpoint-{n}") for n in (1, 2, 3)}
    for name in ("unet", "unet_target"):
        before, at, after = (load_file(os.path.join(checkpoint[n], name, "diffusion_pytorch_model.safetensors"))
                             for n in (1, 2, 3))
        assert all(torch.equal(before[k], at[k]) for k in at), name
        assert any(not torch.equal(at[k], after[k]) for k in at), name
    assert all(torch.equal(heads(checkpoint[1])[k], heads(checkpoint[2])[k]) for k in heads(checkpoint[1]))
    assert any(not torch.equal(heads(checkpoint[2])[k], heads(checkpoint[3])[k]) for k in heads(checkpoint[1]))
