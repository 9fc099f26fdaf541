"""SD3 / SD3.5 teachers (issue 20): the flow-matching family, its math against diffusers' scheduler and pipeline,
both scripts with every objective, exact resume, precomputed latents, and outputs that load (and fuse) in the stock
StableDiffusion3Pipeline. The tiny teachers' two CLIPs differ in width and one has no T5, so no size is fixed."""

import json
import os

import pytest
import torch
from conftest import RESOLUTION, base_args, check_ok, launch, straight_and_resumed

from lcm_utils.consistency import cfg_combine, flow_euler_terminal, flow_phase_edges, predicted_eps, predicted_x0
from lcm_utils.families import StableDiffusion3, family_at
from lcm_utils.objectives import FlowSchedule, lcd_loss, make_objective

CAPTIONS = ["a red square", "a small blue circle on the left", ""]


def sd3_args(sd3_assets, out, teacher="sd3", **overrides):
    flags = dict(train_data_dir=sd3_assets["images"], validation_steps=1000)
    flags.update(overrides)
    return base_args({"teacher": sd3_assets[teacher]}, out, teacher="teacher", **flags)


def euler_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


@pytest.mark.parametrize("name,without_t5", [("sd3", False), ("sd3_no_t5", False), ("sd3", True)])
def test_prompt_embeddings_and_the_unconditional_branch_equal_the_pipeline(sd3_assets, name, without_t5):
    """With T5, without it in the folder, and with --without_t5 (the pipeline loaded with text_encoder_3=None)."""
    teacher = sd3_assets[name]
    assert family_at(teacher) is StableDiffusion3
    family = StableDiffusion3.load(teacher, {}, "cpu", torch.float32, without_t5=without_t5)
    pipe = StableDiffusion3.load_pipeline(teacher, without_t5)
    assert (pipe.text_encoder_3 is None) == (name == "sd3_no_t5" or without_t5)
    with torch.no_grad():  # as the pipeline's __call__ runs it (T5's kernels differ by 1e-5 under autograd)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(CAPTIONS, None, None, device="cpu")
    ours = family.encode_text(CAPTIONS)
    assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["pooled_projections"], pooled)
    uncond = family.unconditional_text()  # "" encoded, as the pipeline's default negative prompt
    with torch.no_grad():  # batch 1 as ours: CLIP's kernels round differently by batch size
        _, negative_one, _, negative_pooled_one = pipe.encode_prompt([""], None, None, device="cpu")
    assert torch.equal(uncond["encoder_hidden_states"], negative_one)
    assert torch.equal(uncond["pooled_projections"], negative_pooled_one)
    torch.testing.assert_close(uncond["pooled_projections"].expand(3, -1), negative_pooled)
    clip_tokens = pipe.tokenizer.model_max_length
    assert ((ours["encoder_hidden_states"][:, clip_tokens:] == 0).all()) == (pipe.text_encoder_3 is None)
    # The conditions the loop hands the denoiser: an empty caption is the unconditional branch.
    cond, _ = family.conditions({"captions": CAPTIONS}, RESOLUTION)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert torch.equal(cond["encoder_hidden_states"][2], negative[0])


def test_t5_in_half_precision_keeps_its_overflowing_projection_in_fp32(sd3_assets):
    family = StableDiffusion3.load(sd3_assets["sd3"], {}, "cpu", torch.float16)
    dtypes = {name: p.dtype for name, p in family.text_encoders[2].named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith("wo.weight")} == {torch.float32}
    assert {d for n, d in dtypes.items() if n.endswith("wi.weight")} == {torch.float16}
    assert family.text_encoders[0].dtype == torch.float16
    assert torch.isfinite(family.encode_text(CAPTIONS)["encoder_hidden_states"].float()).all()


def test_the_solver_step_is_diffusers_euler_step_on_the_guided_velocity():
    """Grid: every k-th point of the teacher's shifted table, ending at sigma 1; each interval ends at the grid
    point below (0 below the first); the step from the guided x0 and eps is FlowMatchEulerDiscreteScheduler.step
    with diffusers' CFG (guidance_scale = w + 1)."""
    noise_scheduler = euler_scheduler(shift=3.0)
    schedule = FlowSchedule.from_scheduler(noise_scheduler, 50, 10.0, "cpu")
    assert torch.equal(schedule.grid, noise_scheduler.timesteps.flip(0)[19::20]) and schedule.grid[-1] == 1000
    g = torch.Generator().manual_seed(0)
    start, end = schedule.intervals(256, g)
    index = torch.searchsorted(schedule.grid, start)
    assert torch.equal(end, torch.where(index > 0, schedule.grid[(index - 1).clamp(min=0)], torch.zeros(256)))
    assert (end == 0).any() and (start == 1000).any()
    z, v_cond, v_uncond = (torch.randn(256, 4, 6, 6, generator=g) for _ in range(3))
    w = torch.rand(256, generator=g) * 6
    alpha, sigma = schedule.alpha_sigma(start, z.ndim)
    x0 = cfg_combine(predicted_x0(v_cond, z, alpha, sigma, "flow"), predicted_x0(v_uncond, z, alpha, sigma, "flow"), w)
    eps = cfg_combine(predicted_eps(v_cond, z, alpha, sigma, "flow"), predicted_eps(v_uncond, z, alpha, sigma, "flow"),
                      w)
    ours = schedule.point(x0, eps, end)
    for i in range(256):
        reference = euler_scheduler(shift=3.0)
        reference.sigmas = torch.stack([start[i], end[i]]) / 1000
        reference.timesteps, reference._step_index = reference.sigmas[:1] * 1000, 0
        v = v_uncond[i] + (w[i] + 1) * (v_cond[i] - v_uncond[i])
        expected = reference.step(v[None], reference.timesteps[0], z[i:i + 1]).prev_sample
        torch.testing.assert_close(ours[i:i + 1], expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_pcm_edges_are_the_points_the_exported_euler_scheduler_visits(shift):
    """With num_inference_steps = --num_phases the exported scheduler (the teacher's, shift_terminal added) lands
    exactly on the phase edges, whatever set_timesteps does to the shift; one phase needs no terminal."""
    base = euler_scheduler(shift=shift)
    assert flow_euler_terminal(1, shift) is None
    for phases in range(1, 9):
        overrides = make_objective("pcm", phases).scheduler_overrides(10.0, 50, "flow", shift)
        exported = euler_scheduler(**{**base.config, **overrides})
        exported.set_timesteps(phases)
        edges = flow_phase_edges(phases, shift, 1000, base.sigma_max, base.sigma_min)
        assert torch.equal(torch.cat([exported.timesteps[1:], torch.zeros(1)]).flip(0), edges)
        assert edges[0] == 0 and (edges.diff() > 0).all()


def test_a_student_equal_to_the_teacher_walks_the_pcm_edges_as_the_stock_euler_sampler(sd3_assets):
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = sd3_assets["sd3"]
    pipe = StableDiffusion3.load_pipeline(teacher)
    schedule = FlowSchedule.from_scheduler(pipe.scheduler, 50, 10.0, "cpu")
    family = StableDiffusion3.load(teacher, {}, "cpu", torch.float32)
    cond = family.encode_text(["a red square"])
    phases = 3
    overrides = make_objective("pcm", phases).scheduler_overrides(10.0, 50, "flow", pipe.scheduler.config.shift)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **overrides)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = pipe("a red square", num_inference_steps=phases, guidance_scale=1.0, latents=noise.clone(),
                     height=RESOLUTION, width=RESOLUTION, output_type="latent").images
        z, t = noise, torch.tensor([1000.0])
        for edge in schedule.phase_edges(phases).flip(0):
            v = StableDiffusion3.denoise(pipe.transformer, z, t, cond)
            z, t = schedule.trajectory(v, z, t, edge.view(1)), edge.view(1)
    torch.testing.assert_close(z, stock, atol=1e-5, rtol=1e-5)


def test_lcd_loss_on_the_flow_schedule_is_zero_for_a_student_that_is_its_own_solver():
    """The LCM boundary written in sigma: c_skip(0) = 1, c_out(0) = 0, and at the grid's points the consistency
    function is the velocity's x0 (c_skip ~ 0), as FlowMatchLCMScheduler samples. PCM's solver step stops at an
    edge between two grid points."""
    from lcm_utils.consistency import boundary_scalings

    schedule = FlowSchedule.from_scheduler(euler_scheduler(shift=3.0), 50, 10.0, "cpu")
    c_skip, c_out = boundary_scalings(torch.tensor([0.0, float(schedule.grid[0])]), schedule.timestep_scaling)
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[1] < 1e-5 and c_out[1] > 0.99999
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(16, 4, 6, 6, generator=g)

    def velocity(z, t, cond, w=None):  # the exact flow of a point mass at z0: v = (z - z0) / sigma
        return (z - z0) / append(t / 1000)

    def append(x):
        return x.view(-1, 1, 1, 1).clamp(min=1e-6)

    for name in ("lcm", "pcm"):
        loss = lcd_loss(z0, {}, {}, torch.full((16,), 3.0), velocity, lambda z, t, c: torch.cat([velocity(
            z[:16], t[:16], c), velocity(z[16:], t[16:], c)]), velocity, schedule, "l2", 0.001, g,
            make_objective(name, 3))
        assert loss.item() < 1e-10, name


@pytest.mark.parametrize("script,objective,teacher,without_t5", [
    ("train_lcm_distill.py", "lcm", "sd3", False),
    ("train_lcm_distill.py", "pcm", "sd3_no_t5", False),
    ("train_lcm_lora.py", "tcd", "sd3", True),
    ("train_lcm_lora.py", "pcm", "sd3_no_t5", False),
])
def test_both_scripts_train_every_objective_and_the_output_loads_in_the_stock_pipeline(
        sd3_assets, tmp_path, script, objective, teacher, without_t5):
    import diffusers

    out = str(tmp_path / "out")
    lora = {"lora_rank": 4} if script == "train_lcm_lora.py" else {}
    validate = script == "train_lcm_distill.py"  # validation is the same for both scripts: run it in two of four
    result = launch(script, sd3_args(sd3_assets, out, teacher, objective=objective, num_phases=2, max_train_steps=2,
                                     validation_steps=2 if validate else 1000, without_t5=without_t5, **lora))
    check_ok(result)
    # The SD defaults (w in [5, 15]) are too strong for SD3: said at the start.
    assert "warning:   w in [5, 15] distils guidance_scale 6 to 16" in result.stdout
    if validate:
        assert os.path.isfile(os.path.join(out, "validation", "step-000002.png"))
        metrics = json.loads(open(os.path.join(out, "validation", "metrics.jsonl")).read().splitlines()[-1])
        assert metrics["reference"] == "teacher Euler 50 steps, guidance 11"  # the middle of w in [5, 15], plus 1
    config = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert config["_class_name"] == {"lcm": "FlowMatchLCMScheduler"}.get(objective, "FlowMatchEulerDiscreteScheduler")
    assert config.get("shift_terminal") == (0.75 if objective == "pcm" else None)
    scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(out, subfolder="scheduler")
    card = open(os.path.join(out, "README.md")).read()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and config["_class_name"] in card
    assert ("text_encoder_3=None" in card) == (teacher == "sd3_no_t5" or without_t5)
    if script == "train_lcm_distill.py":
        transformer = diffusers.SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
        pipe = StableDiffusion3.load_pipeline(sd3_assets[teacher], without_t5, transformer=transformer,
                                              scheduler=scheduler)
        assert "guidance_scale=1" in card
    else:
        pipe = StableDiffusion3.load_pipeline(sd3_assets[teacher], without_t5, scheduler=scheduler)
        pipe.load_lora_weights(out)
    sample = pipe("a red square", num_inference_steps=2, guidance_scale=1.0, height=RESOLUTION, width=RESOLUTION,
                  generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.isfinite(sample).all()
    if objective == "pcm":  # scripts/sample.py, one step included: the exported shift_terminal cannot take one
        import subprocess
        import sys

        from conftest import ROOT, script_env

        grid = str(tmp_path / "grid.png")
        result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample.py"), "--model", out,
                                 "--steps", "1", "2", "--out", grid, "--device", "cpu"], env=script_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and os.path.isfile(grid), result.stderr[-2000:]
        assert "StableDiffusion3Pipeline; pcm with FlowMatchEulerDiscreteScheduler" in result.stdout


def test_the_lora_loads_and_fuses_in_fp16_and_bf16_with_no_conversion(sd3_assets, tmp_path):
    """The adapters in the format StableDiffusion3Pipeline.load_lora_weights reads (alpha != rank kept by the
    adapter metadata): fused equals unfused, in fp32, and the fp16 and bf16 pipelines load and fuse them."""
    out = str(tmp_path / "lora")
    check_ok(launch("train_lcm_lora.py", sd3_args(sd3_assets, out, lora_rank=4, lora_alpha=8, learning_rate=3e-2,
                                                  max_train_steps=2)))
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, height=RESOLUTION, width=RESOLUTION, output_type="latent")
    samples = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pipe = StableDiffusion3.load_pipeline(sd3_assets["sd3"], torch_dtype=dtype)
        base = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
        pipe.load_lora_weights(out)
        unfused = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
        pipe.fuse_lora()
        fused = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
        assert torch.isfinite(fused).all() and not torch.equal(base, unfused)
        samples[dtype] = (unfused.float(), fused.float())
    unfused, fused = samples[torch.float32]
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)


def test_full_sd3_resumes_exactly_and_not_with_other_text_encoders(sd3_assets, tmp_path):
    """Bit-exact resume; the checkpoint records which text encoders conditioned it, so resuming with --without_t5 is
    refused in one line, in a dry run too."""
    from safetensors.torch import load_file

    def make_args(out):
        return sd3_args(sd3_assets, out, "sd3", max_train_steps=4, checkpointing_steps=2, objective="pcm",
                        num_phases=2, proportion_empty_prompts=0.3)

    straight, resumed = straight_and_resumed("train_lcm_distill.py", make_args, tmp_path,
                                             after=("checkpoint-4", "transformer", "transformer_target"))
    for sub in ("transformer", "transformer_target"):
        a = load_file(os.path.join(straight, sub, "diffusion_pytorch_model.safetensors"))
        b = load_file(os.path.join(resumed, sub, "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    result = launch("train_lcm_distill.py", make_args(straight) + ["--without_t5", "--max_train_steps", "6",
                                                                   "--resume_from_checkpoint", "latest", "--dry_run"],
                    quiet=True)
    assert result.returncode != 0 and "encoded by text_encoder, text_encoder_2, text_encoder_3" in result.stderr
    assert "Traceback" not in result.stderr


def test_sd3_from_precomputed_shards_equals_encoding_on_the_fly(sd3_assets, tmp_path):
    """16-channel latents with the VAE's shift and scale, the T5-extended prompt and the pooled embeddings come
    through the shards unchanged."""
    from test_precompute import assert_same_steps, latent_pattern, losses_and_inputs, precompute_args, run_precompute

    out = str(tmp_path / "latents")
    assert run_precompute(precompute_args(sd3_assets["sd3"], out, train_shards_path_or_url=sd3_assets["shards"])) == 0
    teacher = {"teacher": sd3_assets["sd3"]}
    common = dict(train_data_dir=None, max_train_steps=3, center_crop=True, shuffle_buffer_size=4,
                  proportion_empty_prompts=0.5)
    on_the_fly = losses_and_inputs(base_args(teacher, str(tmp_path / "a"), teacher="teacher",
                                             train_shards_path_or_url=sd3_assets["shards"], **common))
    precomputed = losses_and_inputs(base_args(teacher, str(tmp_path / "b"), teacher="teacher",
                                              train_shards_path_or_url=latent_pattern(out), **common))
    assert_same_steps(on_the_fly, precomputed)
    assert on_the_fly[0][0].shape[1] == 16


@pytest.mark.parametrize("edit,message", [
    (lambda f: os.remove(os.path.join(f, "text_encoder_2", "config.json")), "SD3 transformer but no text_encoder_2"),
    ("joint_attention_dim", "joint_attention_dim 64 is below the two CLIP widths 32 + 48"),
    ("pooled_projection_dim", "pooled_projection_dim 64 != the two CLIP projection dims 56"),
    ("without_t5", "--without_t5: the teacher"),
])
def test_a_broken_sd3_folder_is_refused_in_one_line(sd3_assets, tmp_path, edit, message):
    import shutil

    folder = str(tmp_path / "teacher")
    shutil.copytree(sd3_assets["sd3_no_t5"], folder)
    flags = {}
    if callable(edit):
        edit(folder)
    elif edit == "without_t5":  # a folder with no T5 to leave out
        flags["without_t5"] = True
    else:
        path = os.path.join(folder, "transformer", "config.json")
        config = json.load(open(path))
        config[edit] = 64
        json.dump(config, open(path, "w"))
    result = launch("train_lcm_lora.py", sd3_args(sd3_assets, str(tmp_path / "out"), dry_run=True,
                                                  pretrained_teacher_model=folder, **flags), quiet=True)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_resolution_the_transformer_cannot_patch_is_refused(sd3_assets):
    """The tiny VAE halves once and the patches are 2 latent pixels: 24 px is 12 latent pixels (fine), 72 px is 36,
    beyond the 16-patch position embedding."""
    from lcm_utils.config import check_resolution
    from lcm_utils.errors import ConfigError
    from lcm_utils.training import build_parser
    from train_lcm_lora import LoraDistillation

    vae = json.load(open(os.path.join(sd3_assets["sd3"], "vae", "config.json")))
    for resolution, message in ((72, "position embedding covers at most 32 latent pixels"), (24, None)):
        args = build_parser(LoraDistillation, "x").parse_args(["--pretrained_teacher_model", sd3_assets["sd3"],
                                                               "--resolution", str(resolution)])
        if message:
            with pytest.raises(ConfigError, match=message):
                check_resolution(args, vae)
        else:
            check_resolution(args, vae)


@pytest.mark.parametrize("script,engine", [("train_lcm_distill.py", "configs/accelerate_fsdp.yaml")])
def test_sd3_trains_under_fsdp_with_the_shipped_config(sd3_assets, tmp_path, script, engine):
    """Two processes. The shipped FSDP config names the UNet's and the MMDiT's blocks; the classes the model lacks
    are dropped before accelerate would refuse them. (DeepSpeed has nothing family-specific: tested on SD.)"""
    out = str(tmp_path / "out")
    lora = {"lora_rank": 4} if script == "train_lcm_lora.py" else {}
    check_ok(launch(script, sd3_args(sd3_assets, out, "sd3_no_t5", max_train_steps=2, objective="pcm", num_phases=2,
                                     **lora), num_processes=2, engine=engine))
    weights = "transformer" if script == "train_lcm_distill.py" else "pytorch_lora_weights.safetensors"
    assert os.path.exists(os.path.join(out, weights))


def test_the_sd35_large_configs_pass_the_family_checks(tmp_path, monkeypatch):
    """SD3.5 Large's component configs (benchmarks/configs/sd35_large, what --sd35_large_shape builds) are read as
    SD3 and agree with each other; the transformer they describe has SD3.5 Large's 8.1 B parameters."""
    import shutil

    from diffusers import SD3Transformer2DModel

    from lcm_utils.config import check_teacher
    from lcm_utils.training import build_parser
    from train_lcm_lora import LoraDistillation

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "configs",
                           "sd35_large")
    folder = tmp_path / "sd35-large-configs"
    for sub, name in (("transformer", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                      ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json"),
                      ("tokenizer", None), ("tokenizer_2", None)):
        (folder / sub).mkdir(parents=True)
        if name:
            shutil.copy(os.path.join(configs, f"{sub}_config.json"), folder / sub / name)
    args = build_parser(LoraDistillation, "x").parse_args(["--pretrained_teacher_model", str(folder),
                                                           "--resolution", "1024"])
    scheduler_cfg, vae_cfg = check_teacher(args)
    assert scheduler_cfg["shift"] == 3.0 and vae_cfg["shift_factor"] == 0.0609
    assert family_at(str(folder)) is StableDiffusion3
    config = json.load(open(os.path.join(configs, "transformer_config.json")))
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config)
    assert 8.0e9 < sum(p.numel() for p in transformer.parameters()) < 8.3e9
