#!/usr/bin/env python
"""Throughput of one distillation step with the teacher run once on [cond; uncond] (ours) versus twice (diffusers).

    python benchmarks/teacher_batching.py                 # SD-shaped small teacher built in code, CPU or GPU
    python benchmarks/teacher_batching.py --teacher /models/sd15 --resolution 512 --batch_size 8 --dtype fp16
    python benchmarks/teacher_batching.py --sd15_shape --resolution 512 --batch_size 8 2 --dtype fp16  # random SD 1.5

Times forward + backward of `lcd_loss` on random latents and text embeddings (no data loading, no VAE), both
variants alternated in the same process on the same inputs, after warm-up; prints the median samples/s of
each and their ratio.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_memory import add_shape_flags, build_unet, resolve_shape, vae_factor


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="Teacher folder (default: build a small SD-shaped one).")
    add_shape_flags(parser, "128,256,512")
    parser.add_argument("--resolution", type=int, default=64, help="Pixel resolution (latents: / the VAE factor).")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8],
                        help="Batch size(s); several are measured one after the other on the same models.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per measurement.")
    parser.add_argument("--repeats", type=int, default=3, help="Measurements per variant (median kept).")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = resolve_shape(parser.parse_args())

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from lcm_utils.families import StableDiffusion
    from lcm_utils.objectives import SolverSchedule
    from lcm_utils.tiny import SD_SCHEDULER

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.teacher:
        teacher = UNet2DConditionModel.from_pretrained(args.teacher, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(args.teacher, subfolder="scheduler")
        with open(os.path.join(args.teacher, "vae", "config.json")) as f:
            latent = args.resolution // 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    else:  # built in memory (random weights): the step's cost depends on the shapes only
        torch.manual_seed(0)
        with torch.device(device):
            teacher = build_unet(args, args.resolution)
        scheduler = DDPMScheduler.from_config(SD_SCHEDULER)  # as the teacher loads its DDIM config
        latent = args.resolution // vae_factor(args)
    teacher = teacher.to(device).eval().requires_grad_(False)
    with torch.device(device):  # the students' fresh UNets are made on the device (a GPU initialises fast)
        student = StableDiffusion.build_student(teacher, 256).to(device).train()
        target = StableDiffusion.build_student(teacher, 256).to(device).requires_grad_(False)
    teacher.to(dtype)  # frozen teacher in the compute dtype, as with --cast_teacher_unet
    schedule = SolverSchedule.from_scheduler(scheduler, 50, 10.0, device)
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    for B in args.batch_size:
        measure(args, device, dtype, teacher, student, target, schedule, B, latent, params)


def measure(args, device, dtype, teacher, student, target, schedule, B, latent, params):
    from lcm_utils.consistency import guidance_embedding
    from lcm_utils.objectives import lcd_loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device).manual_seed(0)
    dim = teacher.config.cross_attention_dim
    z0 = torch.randn(B, 4, latent, latent, generator=g, device=device)
    cond = {"encoder_hidden_states": torch.randn(B, 77, dim, generator=g, device=device)}
    uncond = {"encoder_hidden_states": torch.randn(1, 77, dim, generator=g, device=device)}
    w = torch.full((B,), 7.5, device=device)

    def with_w(unet):
        return lambda z, t, c, w: unet(z, t, timestep_cond=guidance_embedding(w, 256), **c).sample

    def batched(z, t, c):
        return teacher(z, t, **c).sample

    def twice(z, t, c):  # diffusers' layout: cond and uncond in two forwards
        half = z.shape[0] // 2
        first = teacher(z[:half], t[:half], **{k: v[:half] for k, v in c.items()}).sample
        second = teacher(z[half:], t[half:], **{k: v[half:] for k, v in c.items()}).sample
        return torch.cat([first, second])

    def timed(teacher_fn):
        autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
        for i in range(args.steps + 2):  # the first two are warm-up
            if i == 2:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with autocast:
                loss = lcd_loss(z0, cond, uncond, w, with_w(student), teacher_fn, with_w(target), schedule, "l2",
                                None, torch.Generator(device).manual_seed(i))
            loss.backward()
            student.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return args.steps * B / (time.perf_counter() - start)

    # Alternate the two variants and keep each one's median, so drift (clocks, caches) hits both alike.
    runs = {"teacher twice (diffusers)": [], "teacher once, batched (ours)": []}
    for _ in range(args.repeats):
        runs["teacher twice (diffusers)"].append(timed(twice))
        runs["teacher once, batched (ours)"].append(timed(batched))
    results = {name: sorted(values)[len(values) // 2] for name, values in runs.items()}
    where = f"{torch.cuda.get_device_name()}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated" \
        if device == "cuda" else "cpu"
    print(f"device {device} ({where}), {args.dtype}, UNet {params:.1f} M parameters, batch {B}, "
          f"latents {latent}x{latent}")
    for name, value in results.items():
        print(f"{name:<32}{value:>10.2f} samples/s")
    ours, theirs = results["teacher once, batched (ours)"], results["teacher twice (diffusers)"]
    print(f"{'ratio (ours / diffusers)':<32}{ours / theirs:>10.2f}")


if __name__ == "__main__":
    main()
