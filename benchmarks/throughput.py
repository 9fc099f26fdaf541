#!/usr/bin/env python
"""Training throughput of the real step against its irreducible UNet passes, on images and on precomputed shards.

    python benchmarks/throughput.py                                   # a small SD-shaped teacher, CPU or GPU
    python benchmarks/throughput.py --sd15_shape --resolution 512 --train_batch_size 8 --mixed_precision fp16
    python benchmarks/throughput.py --sdxl_shape --resolution 1024 --train_batch_size 2 --mixed_precision fp16
    python benchmarks/throughput.py --script lora --rows on_the_fly precomputed

Each row runs --steps optimizer steps of train_lcm_distill.py (or train_lcm_lora.py) in its own process, on a
teacher built from a UNet config with random weights (SD 1.5's and SDXL's real configs are in the repo: no
download), data included: webdataset shards of images, or the same shards precomputed by lcm_utils.precompute.
Per row: s/step and samples/s (median step after --warmup steps), peak memory, and the overhead ratio: the
step's time over the time of its irreducible passes (student forward + backward, one batched cond+uncond teacher
forward, one target forward), timed in the same process on the same inputs. Printed as a table and JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lora_memory import add_teacher_flags, peak_memory, resolve_shape, teacher_for  # noqa: E402

# Row name -> (data, extra training flags). "images": shards of JPEGs encoded on the fly; "latents": precomputed.
ROWS = {
    "on_the_fly": ("images", []),
    "precomputed": ("latents", []),
    "precomputed_channels_last": ("latents", ["--channels_last"]),
    "precomputed_torch_compile": ("latents", ["--torch_compile"]),
    "precomputed_teacher_fp32": ("latents", ["--teacher_unet_fp32"]),  # differs only under mixed precision
    "precomputed_log_every_step": ("latents", ["--logging_steps", "1"]),  # a host-device wait every step
}
DEFAULT_ROWS = ("on_the_fly", "precomputed", "precomputed_channels_last", "precomputed_log_every_step")


def time_passes(method, inputs, autocast, repeats):
    """Median seconds of the step's irreducible passes on the step's own inputs: student forward + backward, one
    batched teacher forward (cond and uncond stacked), one target forward."""
    import torch

    from lcm_utils.objectives import stack_conditions

    z0, cond, uncond, w = inputs
    batch = z0.shape[0]
    t = torch.full((batch,), 499, dtype=torch.long, device=z0.device)
    sync = torch.cuda.synchronize if z0.is_cuda else (lambda: None)

    def student():
        with autocast():
            out = method.student_forward(z0, t, cond, w)
        out.float().square().mean().backward()

    def teacher():
        with torch.no_grad(), autocast():
            method.teacher_forward(torch.cat([z0, z0]), torch.cat([t, t]), stack_conditions(cond, uncond))

    def target():
        with torch.no_grad(), autocast():
            method.target_forward(z0, t, cond, w)

    medians = {}
    for name, run in (("student_fwd_bwd", student), ("teacher_fwd", teacher), ("target_fwd", target)):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times[1:])
    for p in method.student.parameters():
        p.grad = None
    return medians


def worker(script, warmup, repeats, train_args):
    """One row in this process: train, time each optimizer step, then time the irreducible passes; print JSON."""
    import torch

    import lcm_utils.training.loop as training
    from lcm_utils.training import main
    from train_lcm_distill import FullDistillation
    from train_lcm_lora import LoraDistillation

    step_ends, last_inputs, holder = [], [], {}
    real_pair = training.consistency_pair

    def keep_inputs(z0, cond, uncond, w, *rest, **kwargs):
        last_inputs[:] = [(z0, cond, uncond, w)]
        return real_pair(z0, cond, uncond, w, *rest, **kwargs)

    training.consistency_pair = keep_inputs
    # No final checkpoint either: at SD 1.5's shapes each row would write 14 GB (weights, target, Adam).
    training.save_checkpoint = lambda *args, **kwargs: None
    base = FullDistillation if script == "full" else LoraDistillation

    class Timed(base):
        """Keeps the method for the pass timing, times each optimizer step, writes no final weights."""

        def build(self, teacher, args, weight_dtype):
            super().build(teacher, args, weight_dtype)
            holder["method"], holder["dtype"] = self, weight_dtype

        def update_target(self, gate=None):
            super().update_target(gate)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

        def export(self, output_dir, weights):
            return ""

    main(Timed, script, train_args)
    steps = sorted(b - a for a, b in zip(step_ends[warmup:], step_ends[warmup + 1:]))
    step = statistics.median(steps)
    dtype = holder["dtype"]
    device = last_inputs[0][0].device

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    passes = time_passes(holder["method"], last_inputs[0], autocast, repeats)
    peak, unit = peak_memory()
    batch = last_inputs[0][0].shape[0]
    print("RESULT " + json.dumps({"s_per_step": step, "samples_per_s": batch / step, "passes": passes,
                                  "overhead_ratio": step / sum(passes.values()), "peak_bytes": peak, "unit": unit,
                                  "steps_timed": len(steps)}), flush=True)


def write_image_shards(folder, count, size, shards=2):
    """Webdataset shards of `count` toy JPEG photos (size x size) with captions; returns the brace pattern."""
    from lcm_utils.tiny import toy_sample, write_shard

    os.makedirs(folder, exist_ok=True)
    per = -(-count // shards)
    for s in range(shards):
        write_shard(os.path.join(folder, f"{s:05d}.tar"),
                    ((f"{s:05d}{i:05d}", *toy_sample(s * per + i, size)) for i in range(per)))
    return os.path.join(folder, "{%05d..%05d}.tar" % (0, shards - 1))


def run(command, env):
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(command[:6])} ...\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_flags(parser, "128,256,512")
    parser.add_argument("--script", choices=("full", "lora"), default="full")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=tuple(ROWS),
                        help="Rows to run (the first is the baseline of the 'vs' column).")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per row.")
    parser.add_argument("--warmup", type=int, default=3, help="Steps left out of the median.")
    parser.add_argument("--repeats", type=int, default=5, help="Timings of each irreducible pass (median).")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--dataloader_num_workers", type=int, default=1)
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = resolve_shape(parser.parse_args())
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    with tempfile.TemporaryDirectory() as tmp:
        teacher = teacher_for(args, tmp)
        count = args.train_batch_size * (args.steps + 2)
        images = write_image_shards(os.path.join(tmp, "images"), count, args.resolution)
        data = {"images": images}
        if any(ROWS[row][0] == "latents" for row in args.rows):
            out = run([sys.executable, "-m", "lcm_utils.precompute", "--pretrained_teacher_model", teacher,
                       "--train_shards_path_or_url", images, "--resolution", str(args.resolution),
                       "--output_dir", os.path.join(tmp, "latents"), "--mixed_precision", args.mixed_precision],
                      env)
            data["latents"] = out.split("--train_shards_path_or_url '")[1].split("'")[0]
        results = {}
        for row in args.rows:
            source, extra = ROWS[row]
            train_args = ["--pretrained_teacher_model", teacher, "--train_shards_path_or_url", data[source],
                          "--output_dir", os.path.join(tmp, row), "--resolution", str(args.resolution),
                          "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.steps),
                          "--max_train_samples", str(count), "--dataloader_num_workers",
                          str(args.dataloader_num_workers), "--checkpointing_steps", "100000",
                          "--validation_steps", "100000", "--report_to", "none", "--seed", "0",
                          "--mixed_precision", args.mixed_precision, "--lr_warmup_steps", "0", *extra]
            if args.script == "lora":
                train_args += ["--lora_rank", "64", "--lora_alpha", "64"]
            out = run([sys.executable, __file__, "--worker", args.script, str(args.warmup), str(args.repeats),
                       *train_args], env)
            results[row] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
            # The whole row as it lands: a run cut short by a time limit still leaves its finished rows.
            print(f"{row}: {results[row]['s_per_step']:.3f} s/step {json.dumps(results[row])}", file=sys.stderr,
                  flush=True)
        from diffusers import UNet2DConditionModel

        params = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").parameters())
    device = "cuda" if "CUDA" in results[args.rows[0]]["unit"] else f"cpu ({os.cpu_count()} cores)"
    print(f"{args.script} script; UNet {params / 1e6:.1f} M parameters; batch {args.train_batch_size} at "
          f"{args.resolution} px; mixed precision {args.mixed_precision}; {device}; median of "
          f"{args.steps - args.warmup - 1} steps; {results[args.rows[0]]['unit']}")
    base = results[args.rows[0]]["samples_per_s"]
    print(f"| row | s/step | samples/s | vs {args.rows[0]} | irreducible s | overhead ratio | peak MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in args.rows:
        r = results[row]
        print(f"| {row} | {r['s_per_step']:.3f} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base:.2f}x | "
              f"{sum(r['passes'].values()):.3f} | {r['overhead_ratio']:.2f} | {r['peak_bytes'] / 2**20:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # internal: one row; then the training flags
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    else:
        main()
