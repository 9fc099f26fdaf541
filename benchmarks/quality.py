#!/usr/bin/env python
"""Few-step quality of the distilled students against their teacher, on the shapes demo (LCM paper, Table 1).

    python benchmarks/quality.py --full demo-output/quality-full --lora demo-output/quality-lora

For held-out prompts and one fixed set of initial noises, samples the teacher with DDIM + CFG at 1/2/4/8 steps
(the better of 'leading' and 'trailing' spacing, per metric; a flow-matching teacher with its Euler scheduler),
the untrained student (the teacher plus a zero w-embedding, or the teacher itself for SD3) and each trained
student with the scheduler it exported (LCMScheduler, or TCDScheduler for TCD and PCM students; the flow-matching
ones for SD3) at 1/2/4/8 steps, and scores every sample set on
  endpoint  latent MSE to the teacher's 50-step result (DDIM or Euler) from the same noise and prompt, over its
            variance (how well the PF-ODE endpoint is reached; lower is better);
  both      fraction of decoded images whose colour and shape the pixel judge reads as the prompt says;
  FD        Frechet distance between fixed image features of the samples and of the held-out real images.
Prints the tables and the issue's targets beside them; writes <out>.md, <out>.json and <out>.png (each metric
against the step count, one line per method).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcm_utils import evaluation as ev  # noqa: E402
from lcm_utils import shapes  # noqa: E402
from lcm_utils.families import family_at  # noqa: E402
from lcm_utils.tensors import to_latent_space  # noqa: E402

UNTRAINED = "LCM, untrained student"
METRICS = {"endpoint": min, "both": max, "fd": min}  # which way is better
LABELS = {"endpoint": "endpoint error (lower is better)", "both": "colour+shape right (higher is better)",
          "fd": "Frechet distance to real images (lower is better)"}


def score(pipe, latents, reference, captions, real_feats):
    images = ev.decode(pipe, latents)
    adherence = shapes.adherence(images, captions)
    return {"endpoint": ev.endpoint_error(latents, reference), "both": adherence["both"],
            "color": adherence["color"], "shape": adherence["shape"],
            "fd": ev.frechet_distance(shapes.image_features(images), real_feats)}


def teacher_row_name(rows):
    """The teacher's row ('DDIM (teacher, CFG)', or 'Euler (teacher, CFG)' for a flow-matching teacher)."""
    return next(name for name in rows if name.endswith("(teacher, CFG)"))


def check_targets(rows, steps):
    """The issue's targets, each as (description, met) where both step counts were measured."""
    teacher_name = teacher_row_name(rows)
    sampler, ddim, out = teacher_name.split(" ")[0], rows[teacher_name], []
    better = {"endpoint": lambda a, b: a < b, "both": lambda a, b: a > b, "fd": lambda a, b: a < b}
    at_least = {"endpoint": lambda a, b: a <= b, "both": lambda a, b: a >= b, "fd": lambda a, b: a <= b}
    students = [name for name in rows if name not in (teacher_name, UNTRAINED)]
    for name in students:
        row = rows[name]
        if 1 in steps:
            out.append((f"{name} 1 step: endpoint <= half of {sampler}-1's",
                        row[1]["endpoint"] <= 0.5 * ddim[1]["endpoint"]))
            out.append((f"{name} 1 step: better adherence and FD than {sampler}-1",
                        better["both"](row[1]["both"], ddim[1]["both"]) and better["fd"](row[1]["fd"], ddim[1]["fd"])))
        if 2 in steps:
            out.append((f"{name} 2 steps: better than {sampler}-2 on all three",
                        all(better[m](row[2][m], ddim[2][m]) for m in METRICS)))
        if 4 in steps:
            out.append((f"{name} 4 steps: adherence and FD at least {sampler}-4's",
                        all(at_least[m](row[4][m], ddim[4][m]) for m in ("both", "fd"))))
        if 2 in steps and 4 in steps:
            out.append((f"{name} moonshot: 2 steps as good as {sampler}-4 on all three",
                        all(at_least[m](row[2][m], ddim[4][m]) for m in METRICS)))
        # Issue 12's targets for students that should improve with steps (TCD, PCM).
        if 4 in steps and 8 in steps:
            out.append((f"{name} no worse from 4 to 8 steps on any metric",
                        all(at_least[m](row[8][m], row[4][m]) for m in METRICS)))
            out.append((f"{name} moonshot: 4 steps as good as {sampler}-8 on colour+shape and FD",
                        all(at_least[m](row[4][m], ddim[8][m]) for m in ("both", "fd"))))
    if UNTRAINED in rows:
        base = rows[UNTRAINED]
        for s in steps:
            winners = [name for name in students
                       if all(better[m](rows[name][s][m], base[s][m]) for m in ("both", "fd"))]
            out.append((f"{s} step{'s' * (s > 1)}: a student beats the untrained student on colour+shape and FD"
                        + (f" ({', '.join(winners)})" if winners else ""), bool(winners)))
    return out


def markdown(rows, steps, refs, targets):
    lines = []
    for metric, label in LABELS.items():
        lines += [f"**{label}**", "", "| method | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in steps) + " |",
                  "| --- |" + " ---: |" * len(steps)]
        for name, row in rows.items():
            cells = []
            for s in steps:
                v = row[s][metric]
                cell = f"{v:.3f}" if metric != "both" else f"{100 * v:.1f}%"
                if "spacing" in row[s]:
                    cell += f" ({row[s]['spacing'][metric][0]})"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    reference_name = next(name for name in refs if name.endswith("-50 (reference)"))
    ref = refs[reference_name]
    lines.append(f"Teacher {reference_name.split(' ')[0]} with CFG (the endpoint reference): colour+shape "
                 f"{100 * ref['both']:.1f}% "
                 f"(colour {100 * ref['color']:.1f}%, shape {100 * ref['shape']:.1f}%), FD {ref['fd']:.3f}. "
                 f"FD floor (two sets of real images): {refs['real vs real']['fd']:.3f}; "
                 f"VAE reconstructions of the real images: {refs['VAE reconstruction']['fd']:.3f}."
                 + (" DDIM spacing in brackets: l = leading, t = trailing." if reference_name.startswith("DDIM")
                    else ""))
    lines += ["", "Targets:", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in targets]
    return "\n".join(lines) + "\n"


def teacher_samplers(teacher):
    """(name, {label: scheduler}) of the teacher's own sampler: DDIM with SD's two spacings for a DDPM teacher (the
    better is kept per metric), the flow-matching Euler scheduler it ships for a flow teacher."""
    if type(teacher.scheduler).__name__.startswith("FlowMatch"):
        return "Euler", {"": teacher.scheduler}
    return "DDIM", {sp: ev.ddim(teacher, sp) for sp in ("leading", "trailing")}


def teacher_rows(args, teacher, captions, noise, real_images, real_feats, steps, started):
    """(reference latents, reference scores, rows) of the teacher (its own sampler + CFG; DDIM: best spacing) and
    the untrained student: what every student is measured against."""
    sampler, schedulers = teacher_samplers(teacher)
    reference = ev.sample_latents(teacher, captions, noise, 50, args.guidance_scale,
                                  scheduler=next(iter(schedulers.values())))
    refs = {f"{sampler}-50 (reference)": score(teacher, reference, reference, captions, real_feats)}
    other_real = shapes.image_features([im for im, _ in shapes.samples("reference", args.num_prompts)])
    refs["real vs real"] = {"fd": ev.frechet_distance(other_real, real_feats)}
    with torch.no_grad():
        recon_latents = teacher.vae.encode(ev.to_pixels(real_images).to(args.device)).latent_dist.mean
    recon = ev.decode(teacher, to_latent_space(recon_latents, teacher.vae.config.scaling_factor,
                                               getattr(teacher.vae.config, "shift_factor", None)))
    refs["VAE reconstruction"] = {"fd": ev.frechet_distance(shapes.image_features(recon), real_feats),
                                  **shapes.adherence(recon, captions)}
    print(f"reference done ({time.time() - started:.0f}s)", flush=True)

    name = f"{sampler} (teacher, CFG)"
    rows = {name: {}}
    for s in steps:
        by_spacing = {sp: score(teacher, ev.sample_latents(teacher, captions, noise, s, args.guidance_scale,
                                                           scheduler=scheduler), reference, captions, real_feats)
                      for sp, scheduler in schedulers.items()}
        best = {m: pick(by_spacing, key=lambda sp: by_spacing[sp][m]) for m, pick in METRICS.items()}
        rows[name][s] = {**{m: by_spacing[best[m]][m] for m in METRICS}, "all": by_spacing}
        if len(schedulers) > 1:
            rows[name][s]["spacing"] = best
    print(f"teacher done ({time.time() - started:.0f}s)", flush=True)
    untrained = ev.load_untrained_student_pipeline(teacher)  # what training adds is measured against this
    scale = args.guidance_scale if ev.takes_guidance(untrained) else 1.0
    rows[UNTRAINED] = {s: score(untrained, ev.sample_latents(untrained, captions, noise, s, scale, seed=args.seed),
                                reference, captions, real_feats)
                       for s in steps}
    return reference, refs, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="assets/shapes-teacher")
    p.add_argument("--full", default=None, help="output_dir of train_lcm_distill.py (unet/ + scheduler/).")
    p.add_argument("--lora", default=None, help="output_dir of train_lcm_lora.py.")
    p.add_argument("--student", action="append", default=[], metavar="NAME=KIND:PATH[,eta=X]",
                   help="More rows, e.g. 'TCD (full)=full:demo-output/tcd' (KIND full or lora; any objective: each "
                        "samples with the scheduler it exported, TCD with the run's gamma; ',eta=X' samples a TCD "
                        "or PCM student with gamma X instead). Repeatable.")
    p.add_argument("--num_prompts", type=int, default=256, help="Held-out prompts (and real images for FD).")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--guidance_scale", type=float, default=6.0,
                   help="Teacher CFG scale; the full student gets the same (its w-embedding is w = scale - 1).")
    p.add_argument("--lora_guidance_scale", type=float, default=1.0,
                   help="For students without a w input (LoRA, SD3 full): CFG is baked in, no CFG pass.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/quality")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--teacher_cache", default=None,
                   help="A .pt file keeping the teacher's and the untrained student's rows (and the reference latents) "
                        "between runs with the same teacher, prompts, seed, guidance and steps: only the students "
                        "are sampled again.")
    args = p.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    started = time.time()

    real_images, captions = zip(*shapes.samples("heldout", args.num_prompts))
    real_feats = shapes.image_features(real_images)
    teacher = ev.load_teacher_pipeline(args.teacher, args.device)
    noise = ev.initial_noise(len(captions), teacher, args.seed)
    key = {k: getattr(args, k) for k in ("teacher", "num_prompts", "steps", "guidance_scale", "seed")}
    cached = torch.load(args.teacher_cache) if args.teacher_cache and os.path.isfile(args.teacher_cache) else None
    if cached is not None and cached["key"] == key:
        reference, refs, rows = cached["reference"], cached["refs"], cached["rows"]
        print(f"teacher and untrained rows from {args.teacher_cache}", flush=True)
    else:
        reference, refs, rows = teacher_rows(args, teacher, captions, noise, real_images, real_feats, steps, started)
        if args.teacher_cache:
            torch.save({"key": key, "reference": reference, "refs": refs, "rows": rows}, args.teacher_cache)
    family = family_at(args.teacher)
    setattr(teacher, family.denoiser_folder, None)  # the students bring their own
    students = [("LCM (full)", "full", args.full, None), ("LCM-LoRA", "lora", args.lora, None)] + [
        ev.student_spec(item, p.error) for item in args.student]
    for name, kind, path, eta in students:
        if not path:
            continue
        student = ev.load_student_pipeline(args.teacher, path, kind, args.device)
        scale = args.guidance_scale if ev.takes_guidance(student) else args.lora_guidance_scale
        sampler = ev.output_sampling_kwargs(path, family.schedule_kind)  # TCD: the run's gamma as eta; PCM: eta 0
        if eta is not None:
            if "eta" not in sampler:
                p.error(f"--student {name}: eta is TCDScheduler's gamma; {path} exported an LCMScheduler")
            sampler = {"eta": eta}
        rows[name] = {s: score(student, ev.sample_latents(student, captions, noise, s, scale, seed=args.seed,
                                                          call_kwargs=sampler), reference, captions, real_feats)
                      for s in steps}
        print(f"{name} done ({time.time() - started:.0f}s)", flush=True)

    targets = check_targets(rows, steps)
    table = markdown(rows, steps, refs, targets)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(f"`python {' '.join(sys.argv)}` ({args.num_prompts} held-out prompts, seed {args.seed}, "
                f"{args.device}, {time.time() - started:.0f}s)\n\n" + table)
    panels = [{"title": LABELS[m], "series": {name: [row[s][m] * (100 if m == "both" else 1) for s in steps]
                                              for name, row in rows.items()}} for m in METRICS]
    ev.line_plots(panels, steps).save(args.out + ".png")
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "rows": {k: {str(s): v for s, v in r.items()} for k, r in rows.items()},
                   "references": refs, "targets": [{"target": t, "met": ok} for t, ok in targets]}, f, indent=1)
    print(f"wrote {args.out}.md, {args.out}.json and {args.out}.png (each metric against steps)")


if __name__ == "__main__":
    main()
