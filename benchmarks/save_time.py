#!/usr/bin/env python
"""Time the trainer's own checkpoint save (save_checkpoint) at SD 1.5 and SDXL shapes, full UNet or LoRA, on CPU.

    python benchmarks/save_time.py --family sd15 --method full [--json PATH] [--out_dir DIR]
    python benchmarks/save_time.py --family sdxl --method lora --lora_rank 64

The UNets are built from the configs below (random weights, nothing downloaded); the AdamW state is real, after
one step. The save is timed as the trainer runs it (no fsync); how long os.sync() takes after it is reported apart.
Full distillation whose whole state does not fit in --ram_gb (SDXL) is measured in two phases: the weights for real,
the AdamW state on the parameters whose state fits, the rest of it extrapolated (labelled so in the table).
"""

import argparse
import copy
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_lcm_distill  # noqa: E402
import train_lcm_lora  # noqa: E402
from lcm_utils.families import StableDiffusion, StableDiffusionXL  # noqa: E402
from lcm_utils.training import checkpointing  # noqa: E402
from lcm_utils.training.setup import make_optimizer  # noqa: E402

GB = 1e9  # decimal gigabytes throughout
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)
FAMILIES = {"sd15": (StableDiffusion, SD15_UNET), "sdxl": (StableDiffusionXL, SDXL_UNET)}
MARGIN_GB = 2.5  # phase 2: a chunk of weights and gradients, and the allocator keeping freed memory (~2 GB seen)
# Values copied into every tensor (a random fill is ~25x slower on 2 cores). The odd length shifts each repeat off
# 4 KiB alignment, so no storage layer can deduplicate or compress the written blocks.
POOL = torch.randn((1 << 24) + 7, generator=torch.Generator().manual_seed(0))
ROWS, OUT = [], [None]  # what the wrapped trainer functions wrote in the save being timed, and where


def fill(tensors):
    """Cheap non-constant contents for freshly allocated tensors."""
    off = 0
    with torch.no_grad():
        for t in tensors:
            flat, i = t.view(-1), 0
            while i < flat.numel():
                n = min(flat.numel() - i, POOL.numel() - off)
                flat[i:i + n] = POOL[off:off + n]
                i, off = i + n, (off + n) % POOL.numel()


def build_unet(config, dtype, time_cond_proj_dim=None):
    """A diffusers UNet2DConditionModel built on meta (seconds, not minutes), then allocated and filled."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config, time_cond_proj_dim=time_cond_proj_dim)
    unet.to_empty(device="cpu").to(dtype)
    fill(unet.parameters())
    return unet


def adam_step(optimizer, params, chunk=1 << 26, fresh=False):
    """One AdamW step on every parameter, gradients a chunk at a time: each one's state is as after one step on all,
    with no whole model of gradients in memory. fresh: fill each parameter before its step, free it after."""
    group = []
    for i, p in enumerate(params):
        if fresh:
            fill([p.data])
        p.grad = torch.full_like(p, 1e-3)
        group.append(p)
        if sum(q.numel() for q in group) >= chunk or i == len(params) - 1:
            optimizer.step()
            for q in group:
                q.grad = None
                if fresh:  # the state_dict names parameters by index: their values are not needed to save it
                    q.data = torch.empty(0)
            group = []


def tree_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def timed(module, name, label):
    """Wrap module.name (as the trainer's code calls it) so that each call adds a row: bytes written, seconds."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        before, start = tree_bytes(OUT[0]), time.perf_counter()
        result = original(*args, **kwargs)
        ROWS.append(dict(part=label(*args), bytes=tree_bytes(OUT[0]) - before, seconds=time.perf_counter() - start))
        return result

    setattr(module, name, wrapper)


timed(train_lcm_distill, "write_model_folder", lambda module, folder, state: os.path.basename(folder) + "/ weights")
timed(train_lcm_lora, "save_tensors", lambda tensors, path: os.path.basename(path))
timed(checkpointing, "save_optimizer_state", lambda *args: "optimizer.pt")


class Run(SimpleNamespace):
    """The run save_checkpoint reads; any field it may come to record besides these (JSON metadata) reads None."""

    def __getattr__(self, name):
        return None


def measure(save, out, repeats):
    """Time save() `repeats` times into a fresh `out`, each followed by os.sync(); the repeat of median save time."""
    results = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        ROWS.clear()
        OUT[0] = out
        os.sync()  # no dirty pages of ours or anyone's left, so the sync after times only this save
        start = time.perf_counter()
        save()
        seconds, rows, written = time.perf_counter() - start, list(ROWS), tree_bytes(out)
        os.sync()
        sync = time.perf_counter() - start - seconds
        rows.append(dict(part="other (snapshot, JSON, rename)", bytes=written - sum(r["bytes"] for r in rows),
                         seconds=seconds - sum(r["seconds"] for r in rows)))
        results.append((rows, dict(bytes=written, seconds=seconds, sync_seconds=sync)))
    shutil.rmtree(out)
    rows, total = sorted(results, key=lambda r: r[1]["seconds"])[len(results) // 2]
    total["repeats"] = [[round(r[1]["seconds"], 2), round(r[1]["sync_seconds"], 2)] for r in results]
    return rows, total


def measure_checkpoint(method, optimizer, acc, out, repeats):
    """The trainer's save_checkpoint() of step 1 into out."""
    run = Run(accelerator=acc, method=method, run_id="save-time", log=lambda message: None,
              args=SimpleNamespace(output_dir=out, seed=0, checkpoints_total_limit=None))
    stream = SimpleNamespace(state_dict=lambda: {"num_workers": 0, "epoch": 0, "position": 0})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return measure(lambda: checkpointing.save_checkpoint(run, 1, optimizer, scheduler, stream, torch.Generator()),
                   out, repeats)


def available_gb():
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) * 1024 / GB for ln in f if ln.startswith("MemAvailable:"))


def rss_gb(peak=False):
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB


def full(args, family, config, acc, out, opt_args):
    """Student + EMA target + AdamW state: in one save if it fits in --ram_gb, else in two phases."""
    method, before = train_lcm_distill.FullDistillation(), rss_gb()
    method.family = family  # time_cond_proj_dim 256: the student's w-embedding (--unet_time_cond_proj_dim)
    method.student = method.student_model = build_unet(config, torch.float32, time_cond_proj_dim=256)
    params = method.trainable_parameters()
    param_bytes = sum(p.numel() * 4 for p in params)
    if param_bytes / GB + before > args.ram_gb:
        raise SystemExit(f"RAM budget {args.ram_gb:.1f} GB: not enough for the weights ({param_bytes / GB:.1f} GB)")
    if not args.parts and 4 * param_bytes / GB + before <= args.ram_gb:
        method.target = copy.deepcopy(method.student).requires_grad_(False)
        optimizer = make_optimizer(params, 1e-5, opt_args)
        adam_step(optimizer, params)
        return measure_checkpoint(method, optimizer, acc, out, args.repeats) + ("one save_checkpoint()",)
    # Phase 1, the weights: the target is a copy of the student (same names, shapes, calls), so saving the student's
    # tensors as the target writes the same bytes. The optimizer has no state yet: phase 2.
    method.target = method.student
    rows, total = measure_checkpoint(method, make_optimizer(params, 1e-5, opt_args), acc, out, args.repeats)
    rows = [dict(r, part="optimizer.pt, no state yet") if r["part"] == "optimizer.pt" else r for r in rows]
    shapes = [p.shape for p in params]
    print(f"phase 1 (weights): {total}", file=sys.stderr, flush=True)  # kept should phase 2 die (memory)
    del method, params
    gc.collect()
    # Phase 2, the AdamW state (twice the parameters' bytes) of the first parameters whose state fits.
    # The machine may be shared: also leave 3 GB of what is available now (others, and the page cache of the write).
    budget, chosen = (min(args.ram_gb - rss_gb(), available_gb() - 3) - MARGIN_GB) * GB / 8, []
    while len(chosen) < len(shapes) and sum(s.numel() for s in chosen) + shapes[len(chosen)].numel() <= budget:
        chosen.append(shapes[len(chosen)])
    if not chosen:
        raise SystemExit(f"--ram_gb {args.ram_gb}: no room for any AdamW state beside {rss_gb():.1f} GB in use")
    params = [torch.nn.Parameter(torch.empty(s)) for s in chosen]  # not resident until adam_step fills them
    optimizer = make_optimizer(params, 1e-5, opt_args)
    adam_step(optimizer, params, fresh=True)
    opt_rows, opt = measure(lambda: checkpointing.save_optimizer_state(acc, None, optimizer, out), out, args.repeats)
    fraction = sum(4 * s.numel() for s in chosen) / param_bytes
    parts = [total, opt]
    rows.append(dict(opt_rows[0], part=f"optimizer.pt, {len(chosen)}/{len(shapes)} params' state ({fraction:.0%})"))
    how = "two phases, each after an os.sync(): the weights by save_checkpoint(), the AdamW state by its function"
    keys = ("bytes", "seconds", "sync_seconds")
    if fraction < 1:  # the state of the other parameters at the rate measured on these
        parts.append({k: opt[k] * (1 / fraction - 1) for k in keys})
        rows.append(dict(parts[-1], part="optimizer.pt, the rest (EXTRAPOLATED)"))
        how += f"; the state of the {1 - fraction:.0%} of the parameters that did not fit EXTRAPOLATED"
    total = {k: sum(p[k] for p in parts) for k in keys}
    return rows, dict(total, extrapolated=fraction < 1, repeats=[p.get("repeats") for p in parts]), how


def lora(args, family, config, acc, out, opt_args):
    """The adapters, their EMA and the AdamW state; the base UNet (not saved) held in fp16, as in the presets."""
    method = train_lcm_lora.LoraDistillation()
    method.family = family
    method.build(SimpleNamespace(denoiser=build_unet(config, torch.float16)), SimpleNamespace(
        lora_target_modules=None, lora_rank=args.lora_rank, lora_alpha=args.lora_rank, lora_dropout=0.0,
        cast_teacher_unet=True, ema_decay=args.ema_decay), torch.float16)
    method.student_model = method.student
    params = method.trainable_parameters()
    optimizer = make_optimizer(params, 1e-4, opt_args)
    adam_step(optimizer, params)
    how = (f"one save_checkpoint(), rank {args.lora_rank}, {sum(p.numel() for p in params) / 1e6:.1f}M adapter "
           f"parameters, EMA {'on' if args.ema_decay > 0 else 'off'}")
    return measure_checkpoint(method, optimizer, acc, out, args.repeats) + (how,)


def line(part, nbytes, seconds):
    size, rate = (f"{nbytes / GB:8.3f}", f"{nbytes / GB / seconds:8.2f}") if nbytes else ("", "")
    print(f"{part:<46}{size:>8}{seconds:8.2f}{rate}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, choices in (("--family", FAMILIES), ("--method", ("full", "lora"))):
        parser.add_argument(flag, choices=choices, default=list(choices)[0])
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--ema_decay", type=float, default=0.95, help="LoRA: > 0 also saves the EMA adapters.")
    parser.add_argument("--out_dir", default=None, help="A folder on the disk to measure (default: the temp dir); "
                        "the checkpoint goes into a new subfolder, deleted after.")
    parser.add_argument("--ram_gb", type=float, default=15.0, help="Most memory this process may use.")
    parser.add_argument("--parts", action="store_true", help="Full: the two-phase measurement even if all fits.")
    parser.add_argument("--repeats", type=int, default=3, help="Saves timed; the table shows the median one.")
    parser.add_argument("--json", default=None, help="Write the figures to this file.")
    args = parser.parse_args()
    args.ram_gb = min(args.ram_gb, rss_gb() + available_gb() - 2)  # the machine may be shared: leave 2 GB to others
    from accelerate import Accelerator

    family, config = FAMILIES[args.family]
    opt_args = SimpleNamespace(adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8,
                               use_8bit_adam=False)
    work = tempfile.mkdtemp(prefix="save_time-", dir=args.out_dir)
    try:
        rows, total, how = (full if args.method == "full" else lora)(
            args, family, config, Accelerator(cpu=True), os.path.join(work, "run"), opt_args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra = " (EXTRAPOLATED)" if total.get("extrapolated") else ""
    print(f"\n{args.family} {args.method}: {how}. In {os.path.dirname(work)}, RAM budget {args.ram_gb:.1f} GB; "
          f"the save does not fsync (as the trainer)")
    print(f"{'part':<46}{'GB':>8}{'s':>8}{'GB/s':>8}")
    for r in rows:
        line(r["part"], r["bytes"], r["seconds"])
    line("save total" + extra, total["bytes"], total["seconds"])
    line("os.sync() after the save returned" + extra, 0, total["sync_seconds"])
    line("save + os.sync()" + extra, total["bytes"], total["seconds"] + total["sync_seconds"])
    print(f"median of {args.repeats} repeats; [save s, sync s] of each: {total['repeats']}; "
          f"peak RSS {rss_gb(True):.1f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), how=how, rows=rows, total=total, peak_rss_gb=rss_gb(True)), f, indent=1)


if __name__ == "__main__":
    main()
