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
