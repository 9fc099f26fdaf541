#!/usr/bin/env python
"""Few-step quality on your own teacher: CLIP score, Frechet distance to reference images and per-prompt diversity.

    python benchmarks/evaluate.py --teacher /models/stable-diffusion-v1-5 \
        --student "LCM-LoRA=lora:out/lcm-lora" --student "PCM=full:out/pcm" \
        --prompts prompts.txt --reference_images coco/val2017 \
        --clip_model openai/clip-vit-large-patch14 --fd_model facebook/dinov2-large \
        --steps 1 2 4 8 --out results/sd15

For every prompt and --samples_per_prompt fixed initial noises, samples the teacher with its own scheduler and CFG
at each step count and at --reference_steps, and each student with the scheduler it exported, then measures
  clip       CLIP score: 100 * max(cos(image embedding, prompt embedding), 0), averaged (higher: closer to the
             prompt), with --clip_model (a transformers CLIPModel folder or Hub id);
  fd         the Frechet distance between features of the samples and of the reference images (lower: closer to
             the reference distribution), the features being --fd_model's (DINOv2 by default, as EDM2
             recommends over Inception; any transformers vision model: its pooled output, else its mean token);
  diversity  the mean pairwise cosine distance between the --fd_model features of one prompt's samples, averaged
             over prompts (0: every noise gives the same image).
Writes PREFIX.md (a table per measure), PREFIX.json and PREFIX.png (each measure against the step count). Every
model loads with from_pretrained, from a local folder or a Hub id; nothing else is downloaded.
"""

import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcm_utils import evaluation as ev  # noqa: E402
from lcm_utils.families import family_at  # noqa: E402
from lcm_utils.tensors import DTYPES  # noqa: E402

MEASURES = {"clip": "CLIP score (higher is better)", "fd": "Frechet distance to the reference images (lower is better)",
            "diversity": "per-prompt diversity (higher: more varied)"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFeatures:
    """A vision model's image features [N, D] (float64, for the Frechet distance), in batches of `batch_size`."""

    def __init__(self, name_or_path, device, batch_size=32):
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.model = AutoModel.from_pretrained(name_or_path).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images):
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start:start + self.batch_size], return_tensors="pt")["pixel_values"]
            out.append(embed_images(self.model, pixels.to(self.device)).double().cpu())
        return torch.cat(out).numpy()


def embed_images(model, pixel_values):
    """[B, D]: a CLIP model's image embedding, else the pooled output (DINOv2: the normed class token), else the
    mean of the last hidden states."""
    if hasattr(model, "get_image_features"):
        features = model.get_image_features(pixel_values=pixel_values)
        return features if torch.is_tensor(features) else features.pooler_output
    output = model(pixel_values=pixel_values)
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output.last_hidden_state.mean(1)


class ClipScore:
    """100 * max(cos(E_image, E_text), 0) per image and its prompt (the CLIPScore of torchmetrics; Hessel et al.
    2021 with w = 100)."""

    def __init__(self, name_or_path, device, batch_size=32):
        from transformers import CLIPModel, CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(name_or_path)
        self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images, prompts):
        scores = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            inputs = self.processor(text=list(prompts[start:end]), images=images[start:end], return_tensors="pt",
                                    padding=True, truncation=True)
            image = embed_images(self.model, inputs["pixel_values"].to(self.device))
            text = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                                attention_mask=inputs["attention_mask"].to(self.device))
            text = text if torch.is_tensor(text) else text.pooler_output
            cos = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
            scores.append((100 * cos.clamp(min=0)).cpu())
        return torch.cat(scores).numpy()


def diversity(features, samples_per_prompt):
    """Mean over prompts of the mean pairwise cosine distance between one prompt's samples: [P*K, D] (prompt-major)
    -> float; nan with one sample per prompt."""
    if samples_per_prompt < 2:
        return float("nan")
    x = features.reshape(-1, samples_per_prompt, features.shape[-1])
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    cos = np.einsum("pkd,pjd->pkj", x, x)
    pairs = samples_per_prompt * (samples_per_prompt - 1)
    return float(((1 - cos).sum((1, 2)) / pairs).mean())


def read_prompts(path, limit=None):
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit(f"error: --prompts: '{path}' has no prompts (one per line)")
    return prompts[:limit] if limit else prompts


def read_images(folder, limit=None):
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)) if os.path.isdir(folder) \
        else []
    if len(names) < 2:
        raise SystemExit(f"error: --reference_images: '{folder}' needs at least 2 images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return [Image.open(os.path.join(folder, n)).convert("RGB") for n in names[:limit]]


def noise_for(pipe, num, resolution, seed):
    """[num, C, h, w] standard normal latents at `resolution` pixels (the denoiser's default size when None)."""
    config = ev.pipeline_denoiser(pipe).config
    side = resolution // pipe.vae_scale_factor if resolution else config.sample_size
    return torch.randn(num, config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))


def measure(images, prompts, args, clip, features, reference_features):
    feats = features(images)
    return {"clip": float(clip(images, prompts).mean()), "fd": ev.frechet_distance(feats, reference_features),
            "diversity": diversity(feats, args.samples_per_prompt)}


def run_method(pipe, prompts, noise, steps, guidance, args, call_kwargs=None):
    latents = ev.sample_latents(pipe, prompts, noise.to(pipe.dtype), steps, guidance, seed=args.seed,
                                chunk=args.batch_size, call_kwargs=call_kwargs)
    return ev.decode(pipe, latents, chunk=args.batch_size)


def markdown(rows, steps, reference_name, reference):
    lines = []
    for m, label in MEASURES.items():
        lines += [f"**{label}**", "", "| method | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in steps) + " |",
                  "| --- |" + " ---: |" * len(steps)]
        lines += [f"| {name} | " + " | ".join(f"{row[s][m]:.4g}" for s in steps) + " |" for name, row in rows.items()]
        lines += ["", f"{reference_name}: {reference[m]:.4g}", ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="The teacher's diffusers folder or Hub id.")
    p.add_argument("--student", action="append", default=[], metavar="NAME=KIND:PATH",
                   help="A training output: KIND full (train_lcm_distill.py) or lora (train_lcm_lora.py). Repeatable.")
    p.add_argument("--prompts", required=True, help="A text file, one prompt per line.")
    p.add_argument("--num_prompts", type=int, default=None, help="Use the first N prompts (default: all).")
    p.add_argument("--reference_images", required=True, help="A folder of real images for the Frechet distance.")
    p.add_argument("--clip_model", required=True, help="A transformers CLIPModel folder or Hub id.")
    p.add_argument("--fd_model", default="facebook/dinov2-large", help="The vision model of the Frechet distance.")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--reference_steps", type=int, default=50, help="The teacher's high step count, for reference.")
    p.add_argument("--samples_per_prompt", type=int, default=2, help="Noises per prompt (the diversity needs 2+).")
    p.add_argument("--guidance_scale", type=float, default=7.5,
                   help="The teacher's CFG scale; a full student with a w input gets the same.")
    p.add_argument("--student_guidance_scale", type=float, default=1.0,
                   help="For students without a w input (LoRA, SD3 full): their guidance is distilled in.")
    p.add_argument("--resolution", type=int, default=None, help="Pixels per side (default: the denoiser's).")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="The pipelines' weights.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="PREFIX: writes PREFIX.md, PREFIX.json and PREFIX.png.")
    p.add_argument("--save_images", default=None,
                   help="Also write every sample as DIR/<method>/<steps>_steps/<index>.png (prompt-major order).")
    args = p.parse_args()
    students = [ev.student_spec(item, p.error) for item in args.student]
    started = time.time()

    prompts = [q for q in read_prompts(args.prompts, args.num_prompts) for _ in range(args.samples_per_prompt)]
    reference_images = read_images(args.reference_images)
    clip = ClipScore(args.clip_model, args.device, args.batch_size)
    features = ImageFeatures(args.fd_model, args.device, args.batch_size)
    reference_features = features(reference_images)
    dtype = DTYPES[args.dtype]
    teacher = ev.load_teacher_pipeline(args.teacher, args.device).to(dtype=dtype)
    teacher.set_progress_bar_config(disable=True)
    noise = noise_for(teacher, len(prompts), args.resolution, args.seed)

    def score(name, pipe, steps, guidance, call_kwargs=None):
        images = run_method(pipe, prompts, noise, steps, guidance, args, call_kwargs)
        if args.save_images:  # prompt-major: image i is prompt i // samples_per_prompt
            folder = os.path.join(args.save_images, re.sub(r"[^A-Za-z0-9._-]+", "_", name), f"{steps}_steps")
            os.makedirs(folder, exist_ok=True)
            for i, image in enumerate(images):
                image.save(os.path.join(folder, f"{i:05d}.png"))
        return measure(images, prompts, args, clip, features, reference_features)

    sampler = type(teacher.scheduler).__name__
    reference_name = f"teacher, {sampler} {args.reference_steps} steps, CFG {args.guidance_scale:g}"
    reference = score("teacher", teacher, args.reference_steps, args.guidance_scale)
    teacher_name = f"teacher ({sampler}, CFG {args.guidance_scale:g})"
    rows = {teacher_name: {s: score("teacher", teacher, s, args.guidance_scale) for s in args.steps}}
    print(f"teacher done ({time.time() - started:.0f}s)", flush=True)
    kind = family_at(args.teacher).schedule_kind
    for name, kind_of_output, path, eta in students:
        pipe = ev.load_student_pipeline(args.teacher, path, kind_of_output, args.device).to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        guidance = args.guidance_scale if ev.takes_guidance(pipe) else args.student_guidance_scale
        call_kwargs = {"eta": eta} if eta is not None else ev.output_sampling_kwargs(path, kind)
        rows[name] = {s: score(name, pipe, s, guidance, call_kwargs) for s in args.steps}
        print(f"{name} done ({time.time() - started:.0f}s)", flush=True)

    table = markdown(rows, args.steps, reference_name, reference)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(f"`python {' '.join(sys.argv)}` ({len(prompts) // args.samples_per_prompt} prompts x "
                f"{args.samples_per_prompt} samples, {len(reference_images)} reference images, seed {args.seed}, "
                f"{args.device}, {time.time() - started:.0f}s)\n\n{table}")
    plotted = {**rows, reference_name: {s: reference for s in args.steps}}
    panels = [{"title": label, "series": {name: [row[s][m] for s in args.steps] for name, row in plotted.items()}}
              for m, label in MEASURES.items() if not all(np.isnan(row[s][m]) for row in rows.values()
                                                          for s in args.steps)]
    ev.line_plots(panels, args.steps).save(args.out + ".png")
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "reference": {"name": reference_name, **reference},
                   "rows": {name: {str(s): v for s, v in row.items()} for name, row in rows.items()}}, f, indent=1)
    print(f"wrote {args.out}.md, {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
