"""scripts/train_demo_teacher.py end to end at a few steps, for both families it trains: the folder it writes is a
teacher of that family which the trainer and the stock pipeline load, with its check's figures logged."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, script_env

from lcm_utils.families import StableDiffusion, StableDiffusion3, family_at


@pytest.mark.parametrize("family,cls", [("sd", StableDiffusion), ("sd3", StableDiffusion3)])
def test_the_demo_teacher_script_writes_a_teacher_of_its_family(tmp_path, family, cls):
    out = str(tmp_path / "teacher")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train_demo_teacher.py"), "--family", family, "--out", out,
         "--num_train", "64", "--batch_size", "4", "--vae_steps", "2", "--unet_steps", "3", "--eval_prompts", "4",
         "--width", "64", "--layers", "1", "--device", "cpu"],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert family_at(out) is cls
    log = json.load(open(os.path.join(out, "training_log.json")))
    assert set(log["ddim50_cfg_adherence"]) == {"color", "shape", "both", "background"}
    assert os.path.isfile(os.path.join(out, "samples.png"))
    pipe = cls.load_pipeline(out)
    if family == "sd3":  # no T5, a VAE that shifts its latents, the flow schedule's shift
        assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor is not None
        assert pipe.scheduler.config.shift == 3.0


def test_the_quality_benchmark_runs_on_a_flow_matching_teacher(tmp_path):
    """benchmarks/quality.py on an SD3-shaped shapes teacher: its own Euler sampler is the teacher's row and the
    endpoint reference, the untrained and the distilled full student (no w input) sample at guidance 1."""
    from conftest import launch

    teacher, out, student = str(tmp_path / "teacher"), str(tmp_path / "quality"), str(tmp_path / "student")
    env = script_env()
    run = [sys.executable, os.path.join(ROOT, "scripts", "train_demo_teacher.py"), "--family", "sd3", "--out", teacher,
           "--num_train", "64", "--batch_size", "4", "--vae_steps", "2", "--unet_steps", "2", "--eval_prompts", "2",
           "--width", "64", "--layers", "1", "--device", "cpu"]
    assert subprocess.run(run, cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0
    images = os.path.join(tmp_path, "images")
    from lcm_utils.tiny import build_image_folder

    build_image_folder(images, num_images=4, size=36)
    result = launch("train_lcm_distill.py", ["--pretrained_teacher_model", teacher, "--train_data_dir", images,
                                             "--output_dir", student, "--resolution", "32", "--train_batch_size", "2",
                                             "--max_train_steps", "1", "--validation_steps", "1000", "--report_to",
                                             "none", "--w_min", "3", "--w_max", "3"])
    assert result.returncode == 0, result.stderr[-2000:]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--teacher", teacher,
                             "--full", student, "--num_prompts", "4", "--steps", "1,2", "--out", out, "--device",
                             "cpu", "--guidance_scale", "4"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.load(open(out + ".json"))
    assert set(report["rows"]) == {"Euler (teacher, CFG)", "LCM, untrained student", "LCM (full)"}
    assert "Euler-50 (reference)" in report["references"]
    assert any(t["target"] == "LCM (full) 2 steps: better than Euler-2 on all three" for t in report["targets"])
