"""End-to-end runs of train_lcm_distill.py on tiny teachers, through `accelerate launch --cpu`."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import RESOLUTION, base_args, check_ok, launch, straight_and_resumed

SCRIPT = "train_lcm_distill.py"
FINAL_OUTPUTS = ("checkpoint-4", "unet", "unet_target")  # what a run killed after checkpoint-2 lacks


def weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


@pytest.fixture(scope="module")
def eps_run(assets, tmp_path_factory):
    """3 steps on the epsilon teacher with non-default LCM settings, validation and a checkpoint."""
    out = str(tmp_path_factory.mktemp("eps_run"))
    result = launch(SCRIPT, base_args(assets, out, timestep_scaling_factor=5.0, num_ddim_timesteps=25,
                                      validation_steps=3, checkpointing_steps=2, report_to="tensorboard"))
    check_ok(result)
    return out, result


def test_outputs_and_model_card(eps_run, assets):
    out, result = eps_run
    for path in ("unet", "unet_target", "scheduler/scheduler_config.json", "README.md", "training_config.yaml",
                 "checkpoint-2/trainer_state.json", "validation/step-000003.png"):
        assert os.path.exists(os.path.join(out, path)), path
    assert "samples_s=" in result.stderr + result.stdout  # the progress bar reports throughput
    card = open(os.path.join(out, "README.md")).read()
    assert "unet/" in card and "guidance_scale = w + 1" in card
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert "base_model" not in metadata and "lcm" in metadata["tags"]  # a local folder is no Hub base model
    assert f'from_pretrained("{assets["teacher_eps"]}"' in card and "guidance_scale=6" in card  # w_min + 1
    assert "(validation/step-000003.png)" in card
    resolved = yaml.safe_load(open(os.path.join(out, "training_config.yaml")))
    assert resolved["num_ddim_timesteps"] == 25 and resolved["seed"] == 0
    # grid: one prompt row, one column per LCM step count (1 and 2)
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(out, "validation/step-000003.png")))
    height, width = grid.shape[:2]
    assert width > 2 * RESOLUTION and height > RESOLUTION  # room for the labels
    samples = grid[height - RESOLUTION:, width - 2 * RESOLUTION:]
    assert samples.std() > 0  # the two samples sit bottom right...
    assert (grid[: height - RESOLUTION] < 128).any() and (grid[:, : width - 2 * RESOLUTION] < 128).any()  # ...labelled
    assert any(name.startswith("events") for _, _, files in os.walk(os.path.join(out, "logs")) for name in files)


def test_student_trained_and_target_is_ema(eps_run, assets):
    out, _ = eps_run
    teacher = weights(os.path.join(assets["teacher_eps"], "unet"))
    student, target = weights(os.path.join(out, "unet")), weights(os.path.join(out, "unet_target"))
    assert max_diff(student, teacher) > 1e-5  # it trained
    assert max_diff(target, student) > 0  # the target lags the student...
    assert max_diff(target, teacher) < max_diff(student, teacher)  # ...and moved less (mu = 0.95)
    assert student["time_embedding.cond_proj.weight"].shape[1] == 256


def test_exported_scheduler_carries_lcm_settings(eps_run):
    out, _ = eps_run
    cfg = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert cfg["_class_name"] == "LCMScheduler"
    assert cfg["timestep_scaling"] == 5.0 and cfg["original_inference_steps"] == 25


@pytest.mark.parametrize("pipeline_name", ["StableDiffusionPipeline", "LatentConsistencyModelPipeline"])
def test_stock_pipelines_sample_from_export(eps_run, assets, pipeline_name):
    import diffusers
    from diffusers import LCMScheduler, UNet2DConditionModel

    out, _ = eps_run
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe = getattr(diffusers, pipeline_name).from_pretrained(assets["teacher_eps"], unet=unet, scheduler=scheduler,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red square", num_inference_steps=2, guidance_scale=6.0, height=RESOLUTION, width=RESOLUTION,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    # the 25-step solver grid is what LCMScheduler samples on: t = 999, 959, ... (k = 40)
    assert (pipe.scheduler.timesteps % 40 == 39).all()


def test_v_prediction_teacher_from_shards_with_huber(assets, tmp_path):
    out = str(tmp_path)
    args = base_args(assets, out, teacher="teacher_v", train_data_dir=None,
                     train_shards_path_or_url=assets["shards"], loss_type="huber", huber_c=0.01,
                     center_crop=True, random_flip=True, proportion_empty_prompts=0.5, max_train_steps=2)
    check_ok(launch(SCRIPT, args))
    assert max_diff(weights(os.path.join(out, "unet")), weights(os.path.join(assets["teacher_v"], "unet"))) > 1e-5


def test_resume_gives_identical_weights(assets, tmp_path):
    """4 steps straight == the same command stopped after checkpoint-2 and resumed with `latest` (bitwise)."""
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", lr_warmup_steps=1,
                  dataloader_num_workers=2, train_batch_size=3)
    straight, resumed = straight_and_resumed(SCRIPT, lambda out: base_args(assets, out, **common), tmp_path,
                                             after=FINAL_OUTPUTS)
    for sub in ("unet", "unet_target"):
        assert max_diff(weights(os.path.join(straight, sub)), weights(os.path.join(resumed, sub))) == 0.0


def test_checkpoint_limit_prunes_oldest(assets, tmp_path):
    out = str(tmp_path)
    check_ok(launch(SCRIPT, base_args(assets, out, max_train_steps=4, checkpointing_steps=1,
                                      checkpoints_total_limit=2)))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]


def test_two_processes_resume_exactly(assets, tmp_path):
    """DDP on CPU: per-rank data, noise and RNG in the checkpoint, lr stepped once per optimizer step, and
    2 processes x (2 steps + resume to 4) == 2 processes x 4 steps, bitwise."""
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", lr_warmup_steps=0)
    straight, resumed = straight_and_resumed(SCRIPT, lambda out: base_args(assets, out, **common), tmp_path,
                                             num_processes=2, after=FINAL_OUTPUTS)
    ck = os.path.join(straight, "checkpoint-2")
    state = json.load(open(os.path.join(ck, "trainer_state.json")))
    assert state["num_processes"] == 2 and state["lr_scheduler"]["last_epoch"] == 2
    ranks = [json.load(open(os.path.join(ck, f"rank_{r}.json"))) for r in (0, 1)]
    assert [r["data"]["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["rng"]["generator"] != ranks[1]["rng"]["generator"]
    for sub in ("unet", "unet_target"):
        assert max_diff(weights(os.path.join(straight, sub)), weights(os.path.join(resumed, sub))) == 0.0


def test_bf16_with_cast_teacher_and_accumulation(assets, tmp_path):
    out = str(tmp_path)
    args = base_args(assets, out, mixed_precision="bf16", cast_teacher_unet=True, gradient_accumulation_steps=2,
                     max_train_steps=2, gradient_checkpointing=True, scale_lr=True, validation_steps=2)
    args = args + ["--checkpointing_steps", "2"]
    check_ok(launch(SCRIPT, args))
    student = weights(os.path.join(out, "unet"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in student.values())  # fp32 masters
    state = json.load(open(os.path.join(out, "checkpoint-2", "trainer_state.json")))
    assert state["lr_scheduler"]["last_epoch"] == 2  # two optimizer steps...
    assert state["lr_scheduler"]["base_lrs"] == [pytest.approx(1e-3 * 2 * 2 * 1)]  # --scale_lr: accum x batch x procs
    data = json.load(open(os.path.join(out, "checkpoint-2", "rank_0.json")))["data"]
    assert data["batches_consumed"] == 4  # ...from four micro-batches


def test_crash_during_save_keeps_last_good_checkpoint(assets, tmp_path, monkeypatch):
    """A save that dies half-way leaves only a .partial folder; `latest` resumes from the previous one."""
    from accelerate.state import AcceleratorState

    from lcm_utils.training import main
    from train_lcm_distill import FullDistillation

    out = str(tmp_path)
    args = base_args(assets, out, max_train_steps=6, checkpointing_steps=2)
    save_state = FullDistillation.save_state

    def dies_at_step_4(self, folder, weights):
        save_state(self, folder, weights)
        if "checkpoint-4" in folder:
            raise RuntimeError("killed during save")

    monkeypatch.setattr(FullDistillation, "save_state", dies_at_step_4)
    try:
        with pytest.raises(RuntimeError, match="killed during save"):
            main(FullDistillation, "test", args)
    finally:
        AcceleratorState._reset_state(True)
    assert os.path.isdir(os.path.join(out, "checkpoint-4.partial"))
    assert not os.path.exists(os.path.join(out, "checkpoint-4"))
    result = launch(SCRIPT, args + ["--resume_from_checkpoint", "latest"])
    check_ok(result)
    assert f"resumed from {os.path.join(out, 'checkpoint-2')}" in result.stdout
    assert not os.path.exists(os.path.join(out, "checkpoint-4.partial"))
    assert os.path.isfile(os.path.join(out, "checkpoint-6", "trainer_state.json"))


def test_resume_from_shards_is_exact(assets, tmp_path):
    """The shard stream's rebuild point (shuffle buffer, input position) restores exactly through the script."""
    common = dict(train_data_dir=None, train_shards_path_or_url=assets["shards"], shuffle_buffer_size=3,
                  max_train_steps=4, checkpointing_steps=2, dataloader_num_workers=2)
    straight, resumed = straight_and_resumed(SCRIPT, lambda out: base_args(assets, out, **common), tmp_path,
                                             after=FINAL_OUTPUTS)
    state = json.load(open(os.path.join(resumed, "checkpoint-2", "rank_0.json")))["data"]
    assert any(s is not None for s in state["shard_states"])
    for sub in ("unet", "unet_target"):
        assert max_diff(weights(os.path.join(straight, sub)), weights(os.path.join(resumed, sub))) == 0.0


def test_sample_script_draws_a_labelled_grid_from_the_full_output(eps_run, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, script_env

    out, _ = eps_run
    png = str(tmp_path / "grid.png")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample.py"), "--model", out, "--prompt",
                             "a red square", "a blue circle", "--steps", "1", "2", "--guidance_scale", "2", "6",
                             "--out", png], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 prompt(s) x 4 (steps, guidance_scale) column(s), full student on StableDiffusionPipeline" in result.stdout
    from PIL import Image

    width, height = Image.open(png).size
    assert width > 4 * RESOLUTION and height > 2 * RESOLUTION
