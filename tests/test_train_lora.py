"""train_lcm_lora.py: the adapters, the shared-weight teacher pass, the diffusers LoRA export, resume, DDP."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import RESOLUTION, base_args, check_ok, launch, straight_and_resumed
from lcm_utils.families import StableDiffusion
from train_lcm_lora import LoraDistillation

DEFAULT_TARGET_MODULES, LORA_WEIGHTS = StableDiffusion.lora_target_modules, StableDiffusion.lora_weights_file

SCRIPT = "train_lcm_lora.py"
LORA = dict(lora_rank=4, lora_alpha=8, learning_rate=1e-2)


def lora_args(assets, out, **overrides):
    return base_args(assets, out, **dict(LORA, **overrides))


def build_method(assets, tmp_path, **flags):
    """An in-process LoraDistillation on the tiny teacher, as the script builds it."""
    from lcm_utils.families import load_teacher
    from lcm_utils.training import build_parser

    argv = lora_args(assets, str(tmp_path), **flags)
    args = build_parser(LoraDistillation, "x").parse_args(argv)
    teacher = load_teacher(args, torch.device("cpu"), torch.float32)
    method = LoraDistillation()
    method.setup(teacher, args, torch.float32)
    method.student_model = method.student
    return method, teacher


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 259]),
            {"encoder_hidden_states": torch.randn(2, 77, 32, generator=g)})


def perturb_adapters(method, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.lora_state().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_teacher_pass_is_the_base_model_with_adapters_off(assets, tmp_path):
    from diffusers import UNet2DConditionModel

    method, _ = build_method(assets, tmp_path)
    perturb_adapters(method)
    z, t, cond = unet_inputs()
    base = UNet2DConditionModel.from_pretrained(assets["teacher_eps"], subfolder="unet").eval()
    with torch.no_grad():
        expected = base(z, t, **cond).sample
        teacher_out = method.teacher_forward(z, t, cond)
        student_out = method.student_forward(z, t, cond, None)
    torch.testing.assert_close(teacher_out, expected, rtol=0, atol=1e-6)
    assert (student_out - expected).abs().max() > 1e-3  # the adapters are live again for the student
    assert all(p.requires_grad for p in method.lora_state().values())  # and trainable again
    assert sum(p.requires_grad for p in method.student.parameters()) == len(method.lora_names)


def test_ema_target_uses_ema_adapters_without_touching_the_student_graph(assets, tmp_path):
    method, _ = build_method(assets, tmp_path, ema_decay=0.5)
    z, t, cond = unet_inputs()
    perturb_adapters(method)  # online != EMA (cloned at build) now
    out = method.student_forward(z, t, cond, None)  # graph built with the online adapters
    with torch.no_grad():
        target_before = method.target_forward(z, t, cond, None)
        method.update_target()  # EMA moves halfway to the online adapters
        target_after = method.target_forward(z, t, cond, None)
    out.square().mean().backward()  # the functional call left the student's tensors intact
    assert (target_after - target_before).abs().max() > 1e-4
    online = method.lora_state()
    for name in method.lora_names[:5]:
        assert not torch.equal(method.ema[name], online[name])


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_run"))
    check_ok(launch(SCRIPT, lora_args(assets, out, max_train_steps=3, checkpointing_steps=3, validation_steps=3)))
    return out


def test_lora_outputs(lora_run, assets):
    out = lora_run
    for path in (LORA_WEIGHTS, "scheduler/scheduler_config.json", "README.md", "validation/step-000003.png",
                 "checkpoint-3/lora.safetensors"):
        assert os.path.exists(os.path.join(out, path)), path
    assert not os.path.exists(os.path.join(out, "unet"))  # no full UNet is written
    card = open(os.path.join(out, "README.md")).read()
    assert "load_lora_weights" in card
    import yaml

    metadata = yaml.safe_load(card.split("---")[1])
    assert {"lora", "lcm-lora"} <= set(metadata["tags"])
    assert "# LCM-LoRA SD 1.x/2.x model" in card
    trained = load_file(os.path.join(out, "checkpoint-3", "lora.safetensors"))
    assert trained and all("lora_" in k for k in trained)  # only adapters are trained and saved
    assert all(v.dtype == torch.float32 for v in trained.values())


def test_export_loads_into_stock_pipeline_and_fuses(lora_run, assets):
    """load_lora_weights reproduces the trained adapters exactly (all of them, alpha included); fuse_lora too."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    out = lora_run
    trained = load_file(os.path.join(out, "checkpoint-3", "lora.safetensors"))
    reference = UNet2DConditionModel.from_pretrained(assets["teacher_eps"], subfolder="unet").eval()
    reference.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGET_MODULES.split(",")))
    missing, unexpected = reference.load_state_dict(trained, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]

    pipe = StableDiffusionPipeline.from_pretrained(assets["teacher_eps"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.load_lora_weights(out)
    loaded = {n.replace(".default_0.", ".default."): p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(trained)  # every adapter arrives (the attention ones included)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    z, t, cond = unet_inputs()
    with torch.no_grad():
        expected = reference(z, t, **cond).sample
        torch.testing.assert_close(pipe.unet(z, t, **cond).sample, expected, rtol=0, atol=1e-5)
        pipe.fuse_lora()
        torch.testing.assert_close(pipe.unet(z, t, **cond).sample, expected, rtol=0, atol=1e-4)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red square", num_inference_steps=2, guidance_scale=1.0, height=RESOLUTION, width=RESOLUTION,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()


def test_lora_resume_with_ema_is_exact(assets, tmp_path):
    # dropout draws from the global torch RNG, so this also checks that nothing else draws from it on resume
    common = dict(max_train_steps=4, checkpointing_steps=2, ema_decay=0.9, lr_scheduler="cosine", lr_warmup_steps=1,
                  lora_dropout=0.1, dataloader_num_workers=1)
    straight, resumed = straight_and_resumed(SCRIPT, lambda out: lora_args(assets, out, **common), tmp_path)
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        a = load_file(os.path.join(straight, "checkpoint-4", name))
        b = load_file(os.path.join(resumed, "checkpoint-4", name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ema = load_file(os.path.join(straight, "ema", LORA_WEIGHTS))
    online = load_file(os.path.join(straight, LORA_WEIGHTS))
    assert sorted(ema) == sorted(online) and any(not torch.equal(ema[k], online[k]) for k in ema)


def test_lora_two_processes(assets, tmp_path):
    out = str(tmp_path)
    check_ok(launch(SCRIPT, lora_args(assets, out, max_train_steps=2, checkpointing_steps=2, validation_steps=2),
                    num_processes=2))
    state = json.load(open(os.path.join(out, "checkpoint-2", "trainer_state.json")))
    assert state["num_processes"] == 2
    assert os.path.isfile(os.path.join(out, LORA_WEIGHTS))
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(out, LORA_WEIGHTS)).values())


def test_lora_bf16_with_cast_base(assets, tmp_path):
    """bf16 autocast, base weights cast to bf16, adapters trained in fp32, validation through load_lora_weights."""
    out = str(tmp_path)
    check_ok(launch(SCRIPT, lora_args(assets, out, mixed_precision="bf16", cast_teacher_unet=True, max_train_steps=2,
                                      checkpointing_steps=2, validation_steps=2, gradient_checkpointing=True)))
    trained = load_file(os.path.join(out, "checkpoint-2", "lora.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in trained.values())
    assert os.path.isfile(os.path.join(out, "validation", "step-000002.png"))


DIFFUSERS_LORA_ONLY_FLAGS = ["lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"]


def test_lora_flags_and_rejections(assets, tmp_path, capsys):
    from lcm_utils.training import build_parser, main
    from test_cli import DIFFUSERS_FULL_FLAGS

    dests = {a.dest for a in build_parser(LoraDistillation, "x")._actions}
    lora_script_flags = [f for f in DIFFUSERS_FULL_FLAGS if f not in ("unet_time_cond_proj_dim", "ema_decay")]
    assert sorted(set(lora_script_flags + DIFFUSERS_LORA_ONLY_FLAGS) - dests) == []
    argv = lora_args(assets, str(tmp_path))
    for extra, expected in ((["--unet_time_cond_proj_dim", "256"], "--unet_time_cond_proj_dim is not a flag of LCM-LoRA"),
                            (["--lora_rank", "0"], "--lora_rank and --lora_alpha must be positive"),
                            (["--ema_decay", "1.0"], "--ema_decay must be in [0, 1)"),
                            (["--lora_target_modules", " , "], "--lora_target_modules is empty")):
        with pytest.raises(SystemExit) as info:
            main(LoraDistillation, "x", argv + extra)
        assert info.value.code == 2
        assert expected in capsys.readouterr().err


def test_yaml_list_of_target_modules(assets, tmp_path):
    from lcm_utils.config import parse_args
    from lcm_utils.training import build_parser

    cfg = tmp_path / "lora.yaml"
    cfg.write_text("lora_target_modules: [to_q, to_k, ff.net.2]\n")
    args = parse_args(build_parser(LoraDistillation, "x"), ["--config", str(cfg)])
    assert args.lora_target_modules == "to_q,to_k,ff.net.2"
    assert LoraDistillation.target_modules(args) == ["to_q", "to_k", "ff.net.2"]


def test_sample_script_draws_a_labelled_grid_from_the_lora_output(lora_run, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, script_env

    png = str(tmp_path / "grid.png")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample.py"), "--model", lora_run,
                             "--steps", "1", "4", "--out", png], cwd=ROOT, env=script_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 prompt(s) x 2 (steps, guidance_scale) column(s), LoRA on StableDiffusionPipeline" in result.stdout
    assert os.path.isfile(png)
