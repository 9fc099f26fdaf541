#!/usr/bin/env python
"""Peak memory of LCM-LoRA (one shared UNet), full distillation, and LoRA with a second teacher copy.

    python benchmarks/lora_memory.py                      # builds a small SD-shaped teacher, CPU or GPU
    python benchmarks/lora_memory.py --teacher /models/sd15 --resolution 512 --train_batch_size 4

Each configuration runs a few training steps in its own process; the peak is the CUDA peak allocation on a
GPU, else the process's peak resident memory (which includes the Python interpreter and libraries, about
the same in every row). The third row is what diffusers' SD LoRA script does: a separate teacher UNet.
"""

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = ("lora", "full", "lora_second_teacher")


def worker(kind, train_args):
    """Run a few training steps of one configuration in this process; print its peak memory as JSON."""
    import torch

    from lcm_utils.training import main
    from train_lcm_distill import FullDistillation
    from train_lcm_lora import LoraDistillation

    class LoraWithSecondTeacher(LoraDistillation):
        """The diffusers LoRA script's layout: the teacher pass runs on its own copy of the UNet."""

        def build(self, teacher, args, weight_dtype):
            self.teacher_copy = copy.deepcopy(teacher.unet)
            if args.cast_teacher_unet:  # as diffusers casts its teacher copy
                self.teacher_copy.to(dtype=weight_dtype)
            super().build(teacher, args, weight_dtype)

        def teacher_forward(self, z, t, cond):
            return self.teacher_copy(z, t, **cond).sample

    method = {"lora": LoraDistillation, "full": FullDistillation, "lora_second_teacher": LoraWithSecondTeacher}[kind]
    main(method, kind, train_args)
    if torch.cuda.is_available():
        peak, unit = torch.cuda.max_memory_allocated(), "CUDA peak allocated"
    else:
        peak, unit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
    print("RESULT " + json.dumps({"kind": kind, "peak_bytes": peak, "unit": unit}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="Teacher folder (default: build an SD-shaped small one).")
    parser.add_argument("--unet_channels", default="128,256,512", help="Width of the built teacher's UNet levels.")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--mixed_precision", default="no")
    args = parser.parse_args()

    from lcm_utils.tiny import build_image_folder, build_tiny_teacher

    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher or build_tiny_teacher(os.path.join(tmp, "teacher"), unet_channels=[
            int(c) for c in args.unet_channels.split(",")])
        images = build_image_folder(os.path.join(tmp, "images"), num_images=16, size=args.resolution)
        results = {}
        for kind in CONFIGS:
            train_args = ["--pretrained_teacher_model", teacher, "--train_data_dir", images,
                          "--output_dir", os.path.join(tmp, kind), "--resolution", str(args.resolution),
                          "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.steps),
                          "--checkpointing_steps", "100000", "--validation_steps", "100000", "--report_to", "none",
                          "--seed", "0", "--mixed_precision", args.mixed_precision]
            if kind != "full":
                train_args += ["--lora_rank", str(args.lora_rank), "--lora_alpha", str(args.lora_rank)]
                if args.mixed_precision != "no":
                    train_args.append("--cast_teacher_unet")
            proc = subprocess.run([sys.executable, __file__, "--worker", kind, *train_args], capture_output=True,
                                  text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            results[kind] = json.loads(lines[0][len("RESULT "):])
        from diffusers import UNet2DConditionModel

        n_params = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").parameters())
    unit = results["lora"]["unit"]
    print(f"UNet parameters: {n_params / 1e6:.1f} M; batch {args.train_batch_size} at {args.resolution} px; "
          f"LoRA rank {args.lora_rank}; mixed precision {args.mixed_precision}; {unit}")
    print(f"{'configuration':<24}{'peak MiB':>12}{'vs LoRA':>10}")
    base = results["lora"]["peak_bytes"]
    for kind in CONFIGS:
        peak = results[kind]["peak_bytes"]
        print(f"{kind:<24}{peak / 2**20:>12.0f}{peak / base:>10.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # internal: one configuration, the rest are training flags
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
