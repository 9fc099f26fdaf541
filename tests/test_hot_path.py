"""The lean step: looks at the device only every --logging_steps (and before checkpoints and validation), the
teacher in the low precision by default, fused AdamW, --channels_last and --torch_compile wired to every UNet."""

import pytest
import torch

from conftest import base_args
from test_interrupts import run_in_process


def logged_steps(monkeypatch):
    """Steps at which the run logged its scalars (accelerate's log)."""
    from accelerate import Accelerator

    steps, real_log = [], Accelerator.log

    def recording_log(self, values, step=None, log_kwargs=None):
        if "train/loss" in values:
            steps.append((step, values["train/loss"]))
        return real_log(self, values, step=step, log_kwargs=log_kwargs or {})

    monkeypatch.setattr(Accelerator, "log", recording_log)
    return steps


def test_the_loss_is_read_only_at_looks_and_averaged_since_the_last(assets, tmp_path, monkeypatch):
    """--logging_steps 2, a checkpoint at step 3, 5 steps: looks at 2, 3, 4 and 5; each logged loss is the mean of
    the steps since the previous look."""
    import lcm_utils.training.loop as training

    real_loss, losses = training.LOSSES["l2"], []

    def recording_loss(*args):
        loss = real_loss(*args)
        losses.append(loss.item())
        return loss

    monkeypatch.setitem(training.LOSSES, "l2", recording_loss)
    steps = logged_steps(monkeypatch)
    assert run_in_process(base_args(assets, str(tmp_path / "out"), max_train_steps=5, logging_steps=2,
                                    checkpointing_steps=3, report_to="tensorboard")) == 0
    assert [step for step, _ in steps] == [2, 3, 4, 5]
    expected = [sum(losses[0:2]) / 2, losses[2], losses[3], losses[4]]
    assert [loss for _, loss in steps] == pytest.approx(expected, rel=1e-6)


def test_fused_adamw_and_the_teacher_dtype(assets, tmp_path, monkeypatch):
    """bf16: the teacher UNet is cast by default and stays fp32 with --teacher_unet_fp32; the optimizer is fused
    (its skip of a non-finite step needs no host read); the student's master weights stay fp32."""
    import lcm_utils.training.loop as training
    from train_lcm_distill import FullDistillation

    seen = {}

    class Recording(FullDistillation):
        def build(self, teacher, args, weight_dtype):
            super().build(teacher, args, weight_dtype)
            seen.setdefault("teacher", []).append(teacher.denoiser.dtype)
            seen.setdefault("student", []).append(self.student.dtype)

    real_make = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer",
                        lambda *a: seen.setdefault("optimizer", []).append(real_make(*a)) or seen["optimizer"][-1])
    for n, extra in enumerate(({}, {"teacher_unet_fp32": True})):
        assert run_in_process(base_args(assets, str(tmp_path / f"out{n}"), mixed_precision="bf16", max_train_steps=1,
                                        **extra), Recording) == 0
    assert seen["teacher"] == [torch.bfloat16, torch.float32]
    assert seen["student"] == [torch.float32, torch.float32]
    assert all(opt.defaults["fused"] for opt in seen["optimizer"])


def test_channels_last_and_compile_reach_every_unet(assets, tmp_path, monkeypatch):
    """Both flags apply to the student, the target and the teacher; a channels-last run trains the same steps as
    the default layout to float tolerance. (Compilation itself is measured by benchmarks/throughput.py: on these
    CPUs it takes minutes.)"""
    import lcm_utils.training.loop as training
    from diffusers import UNet2DConditionModel
    from train_lcm_distill import FullDistillation

    compiled = []
    monkeypatch.setattr(UNet2DConditionModel, "compile", lambda self, *a, **k: compiled.append(id(self)),
                        raising=False)
    real_loss, losses = training.LOSSES["l2"], []

    def recording_loss(*args):
        loss = real_loss(*args)
        losses[-1].append(loss.item())
        return loss

    monkeypatch.setitem(training.LOSSES, "l2", recording_loss)
    layouts = []

    class Recording(FullDistillation):
        def update_target(self, gate=None):
            layouts.append([unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
                            for unet in self.denoisers()])
            super().update_target(gate)

    for name, flags in (("a", dict(channels_last=True, torch_compile=True)), ("b", {})):
        losses.append([])
        assert run_in_process(base_args(assets, str(tmp_path / name), max_train_steps=3, **flags), Recording) == 0
    assert layouts[0] == [True, True, True] and layouts[-1] == [False, False, False]
    assert len(set(compiled)) == 3
    # The same first step to float tolerance; after it, Adam's normalised updates magnify the layout's rounding.
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_validation_measures_the_distance_to_the_teachers_own_samples(assets, tmp_path, monkeypatch):
    """metrics.jsonl and the model card hold, per LCM step count, the latent RMS distance between the exported
    student's sample and the teacher's DDIM-50 sample of the same prompt and seed (recomputed here with stock
    pipelines); the teacher's samples are made once per run."""
    import json
    import os

    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    import lcm_utils.training.validation as training

    real_references, made = training.teacher_references, []
    monkeypatch.setattr(training, "teacher_references", lambda *a: made.append(1) or real_references(*a))
    out = str(tmp_path / "out")
    assert run_in_process(base_args(assets, out, max_train_steps=2, validation_steps=1,
                                    validation_inference_steps="1 2")) == 0
    assert made == [1]
    lines = [json.loads(line) for line in open(os.path.join(out, "validation", "metrics.jsonl"))]
    assert [line["step"] for line in lines] == [1, 2]
    last = lines[-1]
    assert last["guidance_scale"] == 6.0 and last["reference"] == "teacher DDIM 50 steps, guidance 6"

    def sample(pipe, steps):
        return pipe("a red square", num_inference_steps=steps, guidance_scale=6.0, height=16, width=16,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    teacher = StableDiffusionPipeline.from_pretrained(assets["teacher_eps"], safety_checker=None)
    teacher.scheduler = DDIMScheduler.from_pretrained(assets["teacher_eps"], subfolder="scheduler")
    teacher.set_progress_bar_config(disable=True)
    reference = sample(teacher, 50)
    student = StableDiffusionPipeline.from_pretrained(
        assets["teacher_eps"], unet=UNet2DConditionModel.from_pretrained(out, subfolder="unet"),
        scheduler=LCMScheduler.from_pretrained(out, subfolder="scheduler"), safety_checker=None)
    student.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        expected = (sample(student, steps) - reference).square().mean().sqrt().item()
        assert last["teacher_rmse"][str(steps)] == pytest.approx(expected, rel=1e-4)
    card = open(os.path.join(out, "README.md")).read()
    assert "| LCM steps | 1 | 2 |" in card and f"| distance | {last['teacher_rmse']['1']:.4f} |" in card
