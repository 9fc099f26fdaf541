#!/usr/bin/env python
"""Side by side with diffusers' train_lcm_distill_sd_wds.py: marginal time per step of whole training processes.

    python benchmarks/vs_diffusers.py --diffusers_script PATH/train_lcm_distill_sd_wds.py \
        --diffusers_python PATH/venv/bin/python [--steps 4 16] [shape flags as benchmarks/throughput.py]

diffusers' example needs torchvision, whose wheels pin another torch than this project's, so it runs in its own
virtualenv (see the README's Benchmarks section); this script never imports it. Both scripts train the same
teacher (built from the shape flags, random weights) on the same webdataset shards of photos-like toy images,
same batch, resolution and precision, one data worker, no validation, no checkpoint within the run. Each row is
run at two step counts; the marginal time per step, (T2 - T1) / (N2 - N1), leaves out start-up (imports, model
loading, saving), which differs between the scripts and is not what a long run pays. Rows: diffusers; this
project's full script on the images; the same on the shards precomputed by lcm_utils.precompute.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lora_memory import add_shape_flags, build_teacher, resolve_shape  # noqa: E402
from throughput import write_image_shards  # noqa: E402


def timed(command, env):
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(command[:4])} ...\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start, proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers_script", required=True, help="diffusers' train_lcm_distill_sd_wds.py")
    parser.add_argument("--diffusers_python", required=True, help="The Python of a venv with its requirements.")
    add_shape_flags(parser, "64,128,256")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs=2, default=(4, 16), help="The two step counts N1 < N2.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each (row, step count); the fastest counts.")
    args = resolve_shape(parser.parse_args())
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_teacher(os.path.join(tmp, "teacher"), args, args.resolution)
        count = args.train_batch_size * (max(args.steps) + 2)
        images = write_image_shards(os.path.join(tmp, "images"), count, args.resolution + 32)
        _, out = timed([sys.executable, "-m", "lcm_utils.precompute", "--pretrained_teacher_model", teacher,
                        "--train_shards_path_or_url", images, "--resolution", str(args.resolution),
                        "--output_dir", os.path.join(tmp, "latents")], env)
        latents = out.split("--train_shards_path_or_url '")[1].split("'")[0]
        common = ["--pretrained_teacher_model", teacher, "--resolution", str(args.resolution),
                  "--train_batch_size", str(args.train_batch_size), "--max_train_samples", str(count),
                  "--dataloader_num_workers", "1", "--checkpointing_steps", "100000", "--validation_steps", "100000",
                  "--report_to", "tensorboard", "--mixed_precision", "no", "--learning_rate", "1e-6",
                  "--lr_warmup_steps", "0", "--seed", "0"]
        rows = {
            "diffusers train_lcm_distill_sd_wds.py": [args.diffusers_python, args.diffusers_script,
                                                      "--train_shards_path_or_url", images],
            "ours, images on the fly": [sys.executable, "train_lcm_distill.py", "--train_shards_path_or_url", images],
            "ours, precomputed shards": [sys.executable, "train_lcm_distill.py", "--train_shards_path_or_url",
                                         latents],
        }
        times = {row: {} for row in rows}
        for repeat in range(args.repeats):
            for n in args.steps:
                for row, command in rows.items():  # interleaved: drift of a shared machine hits every row alike
                    out_dir = os.path.join(tmp, f"out-{len(times[row])}-{repeat}-{n}-{hash(row) % 1000}")
                    seconds, _ = timed(command + common + ["--max_train_steps", str(n), "--output_dir", out_dir],
                                       env)
                    times[row][n] = min(times[row].get(n, float("inf")), seconds)
                    print(f"{row}: {n} steps in {seconds:.1f} s", file=sys.stderr, flush=True)
    n1, n2 = args.steps
    marginal = {row: (t[n2] - t[n1]) / (n2 - n1) for row, t in times.items()}
    reference = marginal["diffusers train_lcm_distill_sd_wds.py"]
    print(f"batch {args.train_batch_size} at {args.resolution} px, fp32, CPU ({os.cpu_count()} cores); marginal time "
          f"per step between {n1} and {n2} steps, fastest of {args.repeats}; teacher: --unet_channels "
          f"{','.join(map(str, args.unet_channels))} --layers_per_block {args.layers_per_block} --cross_attention_dim "
          f"{args.cross_attention_dim} --text_layers {args.text_layers} --vae_channels "
          f"{','.join(map(str, args.vae_channels))} (its cost shares: benchmarks/cost_shares.py --tiny_flags ...)")
    print("| row | s/step | samples/s | vs diffusers |")
    print("| --- | ---: | ---: | ---: |")
    for row, seconds in marginal.items():
        print(f"| {row} | {seconds:.3f} | {args.train_batch_size / seconds:.2f} | {reference / seconds:.2f}x |")


if __name__ == "__main__":
    main()
