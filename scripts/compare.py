#!/usr/bin/env python
"""Side-by-side grid: the teacher with DDIM (50, 2, 4 steps, CFG), the untrained student and the distilled student
(1, 2, 4 steps, each with its scheduler), on held-out shapes prompts, every column from the same initial noise.
Each few-step column's label carries the judge's colour+shape score over --score_prompts held-out prompts (the grid
shows the first --num_prompts of them), so the grid itself says what distillation bought; the 50-step reference is
drawn for the shown rows only (benchmarks/quality.py scores it: 91.8% on 256 prompts).

    python scripts/compare.py --teacher assets/shapes-teacher --model demo-output/lcm --out demo-output/comparison.png
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcm_utils import evaluation as ev  # noqa: E402
from lcm_utils import shapes  # noqa: E402
from lcm_utils.console import quiet_libraries  # noqa: E402

STUDENT_STEPS = (1, 2, 4)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="assets/shapes-teacher")
    p.add_argument("--model", required=True, help="output_dir of train_lcm_distill.py or train_lcm_lora.py.")
    p.add_argument("--lora", action="store_true", help="--model is a LoRA output (sampled without CFG).")
    p.add_argument("--num_prompts", type=int, default=8, help="Rows shown in the grid.")
    p.add_argument("--score_prompts", type=int, default=256,
                   help="Held-out prompts each column's colour+shape score is measured on (the first --num_prompts "
                        "are shown); 256 with seed 0 are benchmarks/quality.py's prompts and noise.")
    p.add_argument("--guidance_scale", type=float, default=6.0, help="Teacher CFG scale = w + 1 for the student.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell", type=int, default=96, help="Smaller images are enlarged to at least this many pixels.")
    p.add_argument("--out", default="comparison.png")
    p.add_argument("--scores", default=None, help="Also write the columns' scores here as JSON.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    quiet_libraries()  # the grid's scores are the output; loading bars and library notes would bury them
    if not 1 <= args.num_prompts <= args.score_prompts:
        p.error(f"--num_prompts must be in 1..--score_prompts ({args.score_prompts}), got {args.num_prompts}")

    captions = [c for _, c in shapes.samples("heldout", args.score_prompts)]
    teacher = ev.load_teacher_pipeline(args.teacher, args.device)
    noise = ev.initial_noise(len(captions), teacher, args.seed)
    shown = slice(0, args.num_prompts)
    z = ev.sample_latents(teacher, captions[shown], noise[shown], 50, args.guidance_scale,
                          scheduler=ev.ddim(teacher, "leading"))
    reference = ("teacher DDIM 50, reference", ev.decode(teacher, z))
    columns = []  # (method, steps, decoded images), scored
    for steps in (2, 4):
        z = ev.sample_latents(teacher, captions, noise, steps, args.guidance_scale, scheduler=ev.ddim(teacher, "trailing"))
        columns.append(("teacher DDIM", steps, ev.decode(teacher, z)))
    # The student before training: the teacher with LCMScheduler and no CFG (a zero w-embedding, or a zero LoRA).
    untrained = ev.load_untrained_student_pipeline(teacher)
    for steps in STUDENT_STEPS:
        z = ev.sample_latents(untrained, captions, noise, steps, args.guidance_scale, seed=args.seed)
        columns.append(("untrained LCM", steps, ev.decode(untrained, z)))
    del untrained
    student = ev.load_student_pipeline(args.teacher, args.model, "lora" if args.lora else "full", args.device)
    scale = 1.0 if args.lora else args.guidance_scale
    method = ev.training_config(args.model).get("objective", "lcm").upper() + ("-LoRA" if args.lora else "")
    for steps in STUDENT_STEPS:
        z = ev.sample_latents(student, captions, noise, steps, scale, seed=args.seed,
                              call_kwargs=ev.output_sampling_kwargs(args.model))
        columns.append((method, steps, ev.decode(student, z)))

    scores = [{"method": name, "steps": steps, **shapes.adherence(images, captions)}
              for name, steps, images in columns]
    labels = [reference[0]] + [f"{name} {steps}, {100 * s['both']:.0f}% right"
                               for (name, steps, _), s in zip(columns, scores)]
    shown_columns = [reference[1]] + [images for _, _, images in columns]
    rows = [[np.asarray(images[i]) for images in shown_columns] for i in range(args.num_prompts)]
    grid = ev.labelled_grid(rows, captions[shown], labels, min_cell=args.cell)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    if args.scores:
        with open(args.scores, "w") as f:
            json.dump({"score_prompts": args.score_prompts, "seed": args.seed, "columns": scores}, f, indent=1)
    print(f"saved {args.out}: rows = held-out prompts; columns = teacher DDIM 50 | 2 | 4 (CFG {args.guidance_scale}) "
          f"| untrained student LCM 1 | 2 | 4 | {method} student 1 | 2 | 4, same initial noise per row; "
          f"colour+shape right over {args.score_prompts} held-out prompts:")
    for (name, steps, _), s in zip(columns, scores):
        print(f"  {name} {steps}: {100 * s['both']:.1f}%")


if __name__ == "__main__":
    main()
