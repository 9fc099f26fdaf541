"""benchmarks/evaluate.py on the tiny teacher with tiny random CLIP and DINOv2 models built in code: its figures
equal a direct computation on the images it saved."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RESOLUTION, ROOT, base_args, check_ok, launch, script_env
from lcm_utils.tiny import build_tiny_clip_model, build_tiny_dinov2

PROMPTS = ["a red square", "a blue circle on a green background", "a yellow triangle"]
SAMPLES = 2


@pytest.fixture(scope="module")
def evaluated(assets, tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluate")
    student = str(base / "student")
    check_ok(launch("train_lcm_distill.py", base_args(assets, student, max_train_steps=1, objective="pcm",
                                                      num_phases=2)))
    clip, dino = build_tiny_clip_model(str(base / "clip")), build_tiny_dinov2(str(base / "dino"))
    (base / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    out, images = str(base / "result"), str(base / "images")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "evaluate.py"), "--teacher", assets["teacher_eps"],
         "--student", f"PCM (2 phases)=full:{student}", "--prompts", str(base / "prompts.txt"),
         "--reference_images", assets["images"], "--clip_model", clip, "--fd_model", dino, "--steps", "1", "2",
         "--reference_steps", "4", "--samples_per_prompt", str(SAMPLES), "--resolution", str(RESOLUTION),
         "--guidance_scale", "3", "--out", out, "--save_images", images, "--device", "cpu"],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "images": images, "clip": clip, "dino": dino, "stdout": result.stdout}


def load_pngs(folder):
    return [Image.open(os.path.join(folder, n)).convert("RGB") for n in sorted(os.listdir(folder))]


def test_outputs_and_rows(evaluated):
    out = evaluated["out"]
    assert all(os.path.isfile(out + ext) for ext in (".md", ".json", ".png"))
    report = json.load(open(out + ".json"))
    assert list(report["rows"]) == ["teacher (DDIMScheduler, CFG 3)", "PCM (2 phases)"]
    assert all(sorted(row) == ["1", "2"] for row in report["rows"].values())
    assert report["reference"]["name"].startswith("teacher, DDIMScheduler 4 steps")
    table = open(out + ".md").read()
    assert "**CLIP score (higher is better)**" in table and "| PCM (2 phases) |" in table
    assert len(load_pngs(os.path.join(evaluated["images"], "PCM_2_phases_", "2_steps"))) == len(PROMPTS) * SAMPLES


def test_figures_equal_a_direct_computation(evaluated, assets):
    """CLIP score, FD and diversity of one row recomputed from its saved images: CLIP through the model's own
    towers, FD with tr((S_a S_b)^1/2) from the eigenvalues of S_a S_b, diversity as a loop over pairs."""
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    row = json.load(open(evaluated["out"] + ".json"))["rows"]["PCM (2 phases)"]["2"]
    images = load_pngs(os.path.join(evaluated["images"], "PCM_2_phases_", "2_steps"))
    prompts = [p for p in PROMPTS for _ in range(SAMPLES)]

    processor, model = CLIPProcessor.from_pretrained(evaluated["clip"]), CLIPModel.from_pretrained(evaluated["clip"])
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        vision = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    cos = (vision @ text.T).diagonal() / (vision.norm(dim=-1) * text.norm(dim=-1))
    assert (cos > 0).any()  # some images score above the clamp, so the figure is not a run of zeros
    assert row["clip"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)

    dino_processor, dino = AutoImageProcessor.from_pretrained(evaluated["dino"]), AutoModel.from_pretrained(
        evaluated["dino"])

    def features(ims):
        with torch.no_grad():
            return dino(pixel_values=dino_processor(images=ims, return_tensors="pt")["pixel_values"]).pooler_output \
                .double().numpy()

    reference = [Image.open(os.path.join(assets["images"], n)).convert("RGB")
                 for n in sorted(os.listdir(assets["images"])) if n.endswith((".png", ".jpg"))]
    a, b = features(images), features(reference)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)).sum()
    fd = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * root_trace
    assert row["fd"] == pytest.approx(fd, rel=1e-4)

    distances = [1 - a[p * SAMPLES + i] @ a[p * SAMPLES + j] / np.linalg.norm(a[p * SAMPLES + i])
                 / np.linalg.norm(a[p * SAMPLES + j])
                 for p in range(len(PROMPTS)) for i in range(SAMPLES) for j in range(SAMPLES) if i != j]
    assert row["diversity"] == pytest.approx(np.mean(distances), rel=1e-6) and row["diversity"] > 0


def test_bad_inputs_fail_with_one_line(assets, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "prompts.txt").write_text("a red square\n")
    common = ["--teacher", assets["teacher_eps"], "--clip_model", "x", "--out", str(tmp_path / "o")]
    for extra, expected in [
        (["--prompts", str(tmp_path / "empty.txt"), "--reference_images", assets["images"]], "--prompts"),
        (["--prompts", str(tmp_path / "prompts.txt"), "--reference_images", str(tmp_path)], "--reference_images"),
    ]:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "evaluate.py"), *common, *extra],
                                cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(f"error: {expected}")
