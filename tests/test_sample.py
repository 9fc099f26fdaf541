"""scripts/sample.py: one summary line by default, one error line per user mistake, and it samples as the trained
objective says (PCM at its phase count, TCD with its gamma as eta)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, base_args, check_ok, launch, script_env

SCRIPT = os.path.join(ROOT, "scripts", "sample.py")


def sample(*args):
    """Run the script offline on CPU; (CompletedProcess, the non-empty lines of stdout and stderr together)."""
    result = subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, env=script_env(),
                            capture_output=True, text=True, timeout=300)
    return result, [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pcm_run(assets, tmp_path_factory):
    """A full PCM student (2 phases, tcd_gamma 0.5 unused) after one step; its scheduler walks a 10-step grid."""
    out = str(tmp_path_factory.mktemp("sample") / "pcm")
    check_ok(launch("train_lcm_distill.py", base_args(assets, out, max_train_steps=1, objective="pcm", num_phases=2,
                                                      tcd_gamma=0.5, num_ddim_timesteps=10)))
    return out


def test_pcm_output_samples_at_its_phase_count_in_one_line(pcm_run, tmp_path):
    png = tmp_path / "grid.png"
    result, lines = sample("--model", pcm_run, "--prompt", "a red square", "a blue circle", "--out", png)
    check_ok(result)
    assert lines == [f"saved {png}: 2 prompt(s) x 1 (steps, guidance_scale) column(s), full student on "
                     f"StableDiffusionPipeline; pcm with TCDScheduler, steps [2], guidance_scale [6.0], eta 0"]
    assert os.path.isfile(png)


def test_tcd_output_samples_with_its_gamma_and_verbose_shows_progress(pcm_run, tmp_path):
    """The same weights and TCDScheduler, with a config that says TCD (what a TCD run exports beside them)."""
    tcd = str(tmp_path / "tcd")
    shutil.copytree(pcm_run, tcd, ignore=shutil.ignore_patterns("checkpoint-*", "unet_target"))
    config = tmp_path / "tcd" / "training_config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "objective": "tcd"}))
    result, _ = sample("--model", tcd, "--guidance_scale", "2", "--out", tmp_path / "grid.png", "--verbose")
    check_ok(result)
    assert result.stdout.strip().endswith("tcd with TCDScheduler, steps [1, 2, 4, 8], guidance_scale [2.0], eta 0.5")
    assert "it/s" in result.stderr  # the loading and sampling bars, kept out without --verbose


def test_help_shows_the_whole_description():
    result, _ = sample("--help")
    check_ok(result)
    text = " ".join(result.stdout.split())
    assert ("Sample a distilled model (full or LoRA, SD or SDXL; LCM, TCD or PCM) with a stock diffusers pipeline "
            "and its exported scheduler, as a labelled grid: one row per prompt, one column per (steps, "
            "guidance_scale).") in text
    assert "python scripts/sample.py --model lcm-sd15" in text and "--verbose" in text


def light_copy(model, tmp, with_config=True, scheduler_class="TCDScheduler"):
    """A copy of an output's scheduler (as `scheduler_class`) and, `with_config`, its training_config.yaml: all the
    script reads before the weights."""
    copy = os.path.join(tmp, "copy")
    shutil.copytree(os.path.join(model, "scheduler"), os.path.join(copy, "scheduler"))
    if with_config:
        shutil.copy(os.path.join(model, "training_config.yaml"), copy)
    path = pathlib.Path(copy, "scheduler", "scheduler_config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": scheduler_class}))
    return copy


MISTAKES = {  # name: (flags, given the trained output and an empty folder; what the error line says)
    "missing-model": (lambda m, tmp: ["--model", os.path.join(tmp, "none")], "--model: folder"),
    "not-an-output": (lambda m, tmp: ["--model", tmp], "has no scheduler/scheduler_config.json"),
    "no-teacher": (lambda m, tmp: ["--model", light_copy(m, tmp, with_config=False)], "--teacher: "),
    "missing-teacher": (lambda m, tmp: ["--model", m, "--teacher", os.path.join(tmp, "none")], "--teacher: folder"),
    "not-a-teacher": (lambda m, tmp: ["--model", m, "--teacher", tmp], "has no model_index.json"),
    "offline-hub-teacher": (lambda m, tmp: ["--model", m, "--teacher", "nobody/no-such-teacher"], "HF_HUB_OFFLINE"),
    "zero-steps": (lambda m, tmp: ["--model", m, "--steps", "1", "0"], "--steps: each step count must be in 1..10"),
    "too-many-steps": (lambda m, tmp: ["--model", m, "--steps", "11"], "--steps: each step count must be in 1..10"),
    "steps-not-a-number": (lambda m, tmp: ["--model", m, "--steps", "two"], "argument --steps: invalid int"),
    "eta-out-of-range": (lambda m, tmp: ["--model", m, "--eta", "2"], "--eta: TCDScheduler's gamma must be in"),
    "eta-for-lcm": (lambda m, tmp: ["--model", light_copy(m, tmp, scheduler_class="LCMScheduler"), "--eta", "0.3"],
                    "--eta: this model samples with LCMScheduler, which takes no eta"),
    "out-in-a-missing-folder": (lambda m, tmp: ["--model", m, "--out", os.path.join(tmp, "no", "g.png")], "--out: "),
    "out-is-a-folder": (lambda m, tmp: ["--model", m, "--out", tmp], "--out: "),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_is_one_error_line_and_exit_status_2(pcm_run, tmp_path, mistake):
    flags, expected = MISTAKES[mistake]
    result, lines = sample("--out", tmp_path / "grid.png", *flags(pcm_run, str(tmp_path)))
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
