#!/usr/bin/env python
"""Side-by-side grid: the teacher with DDIM (50, 2, 4 steps, CFG) against the distilled student with LCM (1, 2, 4
steps), on held-out shapes prompts, every column from the same initial noise.

    python scripts/compare.py --teacher assets/shapes-teacher --model demo-output/lcm --out demo-output/comparison.png
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcm_utils import evaluation as ev  # noqa: E402
from lcm_utils import shapes  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="assets/shapes-teacher")
    p.add_argument("--model", required=True, help="output_dir of train_lcm_distill.py or train_lcm_lora.py.")
    p.add_argument("--lora", action="store_true", help="--model is a LoRA output (sampled without CFG).")
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--guidance_scale", type=float, default=6.0, help="Teacher CFG scale = w + 1 for the student.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell", type=int, default=96, help="Smaller images are enlarged to at least this many pixels.")
    p.add_argument("--out", default="comparison.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    captions = [c for _, c in shapes.samples("heldout", args.num_prompts)]
    teacher = ev.load_teacher_pipeline(args.teacher, args.device)
    noise = ev.initial_noise(len(captions), teacher, args.seed)
    columns = []
    for steps, spacing in ((50, "leading"), (2, "trailing"), (4, "trailing")):
        z = ev.sample_latents(teacher, captions, noise, steps, args.guidance_scale, scheduler=ev.ddim(teacher, spacing))
        columns.append((f"DDIM {steps}", ev.decode(teacher, z)))
    student = ev.load_student_pipeline(args.teacher, args.model, "lora" if args.lora else "full", args.device)
    scale = 1.0 if args.lora else args.guidance_scale
    for steps in (1, 2, 4):
        z = ev.sample_latents(student, captions, noise, steps, scale, seed=args.seed,
                              call_kwargs=ev.output_sampling_kwargs(args.model))
        columns.append((f"LCM {steps}", ev.decode(student, z)))

    rows = [[np.asarray(images[i]) for _, images in columns] for i in range(len(captions))]
    grid = ev.labelled_grid(rows, captions, [label for label, _ in columns], min_cell=args.cell)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    print(f"saved {args.out}: rows = held-out prompts; columns = teacher DDIM 50 | 2 | 4 (CFG {args.guidance_scale}) "
          f"| student LCM 1 | 2 | 4, same initial noise per row")


if __name__ == "__main__":
    main()
