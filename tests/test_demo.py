"""The shipped demo: the shapes dataset and its pixel judge, the shipped teacher, and a short distillation of it
that must bring the student's 2-step samples closer to the teacher's 50-step DDIM endpoints."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lcm_utils import evaluation as ev
from lcm_utils import shapes
from tests.conftest import ROOT, check_ok, launch, script_env

TEACHER = os.path.join(ROOT, "assets", "shapes-teacher")


def test_dataset_is_deterministic_and_balanced():
    a = [c for _, c in shapes.samples("train", 300)]
    b = [c for _, c in shapes.samples("train", 300)]
    assert a == b
    assert a != [c for _, c in shapes.samples("heldout", 300)]
    parsed = [shapes.parse_caption(c) for c in a]
    assert all(color != background for color, _, background in parsed)
    for i, options in ((0, shapes.PALETTE), (1, shapes.SHAPES)):
        counts = np.array([sum(p[i] == o for p in parsed) for o in options])
        assert counts.min() > 0.5 * counts.mean(), counts


def test_judge_reads_real_images_exactly():
    images, captions = zip(*shapes.samples("heldout", 500))
    scores = shapes.adherence(images, captions)
    assert scores == {"color": 1.0, "shape": 1.0, "both": 1.0, "background": 1.0}


def test_judge_rejects_wrong_captions_and_empty_images():
    images, captions = zip(*shapes.samples("heldout", 200))
    shifted = captions[1:] + captions[:1]
    assert shapes.adherence(images, shifted)["both"] < 0.3
    blank = np.full((32, 32, 3), shapes.PALETTE["red"], dtype=np.uint8)
    assert shapes.classify(blank) == (None, None, "red")


def test_frechet_distance_separates_real_from_noise():
    real = shapes.image_features([im for im, _ in shapes.samples("heldout", 300)])
    other = shapes.image_features([im for im, _ in shapes.samples("reference", 300)])
    rng = np.random.default_rng(0)
    noise = shapes.image_features([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(300)])
    assert ev.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert ev.frechet_distance(real, other) < 0.1 * ev.frechet_distance(real, noise)


def test_frechet_distance_matches_closed_form_for_gaussians():
    # Two Gaussians with diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sqrt(va) - sqrt(vb))^2.
    rng = np.random.default_rng(0)
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    a = rng.normal(0, np.sqrt(va), (200000, 3))
    b = rng.normal(1, np.sqrt(vb), (200000, 3))
    expected = 3 * 1.0 + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert ev.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_shipped_teacher_loads_with_stock_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TEACHER)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == shapes.IMAGE_SIZE
    assert pipe.scheduler.config.clip_sample is False and pipe.scheduler.config.prediction_type == "epsilon"


def test_shipped_sd3_teacher_loads_and_follows_the_prompt():
    """assets/shapes-teacher-sd3 (scripts/sd3_quality.sh trained it on a GPU) is an SD3 folder without T5 that the
    stock pipeline loads, on a shifted flow-matching schedule, whose samples with CFG follow their own prompts (its
    log: 65.6% colour+shape at 50 Euler steps on 256 held-out prompts; 20 steps on 32 here: 47% when written)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    folder = os.path.join(ROOT, "assets", "shapes-teacher-sd3")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert size < 10 * 2**20, size
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == shapes.IMAGE_SIZE
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    captions = [c for _, c in shapes.samples("heldout", 32)]
    teacher = ev.load_teacher_pipeline(folder, "cpu")
    noise = ev.initial_noise(len(captions), teacher, seed=0)
    images = ev.decode(teacher, ev.sample_latents(teacher, captions, noise, 20, 6.0))
    scores = shapes.adherence(images, captions)
    assert scores["color"] >= 0.95 and scores["both"] >= 0.4, scores
    assert shapes.adherence(images, captions[1:] + captions[:1])["both"] < 0.2  # another sample's prompt


def test_short_distillation_makes_few_step_samples_follow_the_prompt(tmp_path):
    """Before training the student is the teacher with a zero w-embedding: sampled with LCMScheduler it draws the
    teacher's unguided posterior means, blurry at 1 step. A short distillation must make its 1- and 2-step samples
    follow the prompt clearly better while staying near the guided teacher's trajectories. The 2-step latent error
    itself is not the signal here: a posterior mean is the MSE-optimal guess, so the untrained student starts low
    (0.29) and a short run's sharper samples score 0.38; it falls with longer training (README "Quality on the
    shapes demo")."""
    shards = shapes.write_shards(str(tmp_path / "shapes"), "train", count=1024, per_shard=512)
    captions = [c for _, c in shapes.samples("heldout", 64)]
    teacher = ev.load_teacher_pipeline(TEACHER, "cpu")
    noise = ev.initial_noise(len(captions), teacher, seed=0)
    reference = ev.sample_latents(teacher, captions, noise, 50, 6.0, scheduler=ev.ddim(teacher, "leading"))

    real = shapes.image_features([im for im, _ in shapes.samples("heldout", len(captions))])

    def measure(pipe):
        out = {}
        for steps in (1, 2):
            z = ev.sample_latents(pipe, captions, noise, steps, 6.0)
            images = ev.decode(pipe, z)
            out[steps] = dict(shapes.adherence(images, captions), endpoint=ev.endpoint_error(z, reference),
                              fd=ev.frechet_distance(shapes.image_features(images), real))
        return out

    start = measure(ev.load_untrained_student_pipeline(teacher))

    out = str(tmp_path / "lcm")
    check_ok(launch("train_lcm_distill.py", [
        "--pretrained_teacher_model", TEACHER, "--train_shards_path_or_url", shards, "--output_dir", out,
        "--resolution", 32, "--train_batch_size", 16, "--max_train_steps", 300, "--learning_rate", 2e-4,
        "--lr_warmup_steps", 0, "--w_min", 4, "--w_max", 6, "--validation_steps", 1000, "--report_to", "none",
        "--checkpointing_steps", 1000, "--seed", 0]))
    end = measure(ev.load_student_pipeline(TEACHER, out, "full", "cpu"))
    # Measured when written (64 prompts): 1 step both 14% -> 41%, FD 2.28 -> 1.57; 2 steps colour 70% -> 83%,
    # both 55% -> 61%, endpoint error 0.29 -> 0.38.
    assert end[1]["both"] > start[1]["both"] + 0.2, (start, end)
    assert end[1]["fd"] < 0.8 * start[1]["fd"], (start, end)
    assert end[2]["color"] > start[2]["color"] + 0.06, (start, end)
    assert end[2]["both"] > start[2]["both"], (start, end)
    assert end[2]["endpoint"] < 1.5 * start[2]["endpoint"], (start, end)

    # The demo's own grid shows the same gain: scripts/compare.py's column scores are the judge's numbers above.
    grid, scores = str(tmp_path / "comparison.png"), str(tmp_path / "scores.json")
    check_ok(subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compare.py"), "--teacher", TEACHER,
                             "--model", out, "--num_prompts", "4", "--score_prompts", str(len(captions)),
                             "--out", grid, "--scores", scores], cwd=ROOT, env=script_env(), capture_output=True,
                            text=True, timeout=300))
    columns = {(c["method"], c["steps"]): c["both"] for c in json.load(open(scores))["columns"]}
    for steps in (1, 2):
        assert columns[("untrained LCM", steps)] == pytest.approx(start[steps]["both"]), columns
        assert columns[("LCM", steps)] == pytest.approx(end[steps]["both"]), columns
    from PIL import Image

    assert Image.open(grid).size[0] > 9 * 96  # the reference, 2 teacher, 3 untrained and 3 student columns
