#!/usr/bin/env python
"""FLOPs per sample of one full-distillation training step, by part: text encoders, VAE encode, the UNet passes.

    python benchmarks/cost_shares.py [--families tiny sd15 sdxl] [--json PATH] [--time]

Models are built on the meta device from the public configs written below (SD 1.5, SDXL base 1.0) and from the
teacher benchmarks/vs_diffusers.py trains (tiny), and counted with torch.utils.flop_counter.FlopCounterMode.
--time also times the same parts with random weights (GPU if any, else CPU; fp32) to set time shares beside them.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lora_memory adds the repository root itself

from lora_memory import add_shape_flags, build_teacher, resolve_shape  # noqa: E402

W_EMBED = 256  # train_lcm_distill.py --unet_time_cond_proj_dim default: the student's and target's w input
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
BIG_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             hidden_act="gelu", projection_dim=1280)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
           norm_num_groups=32, sample_size=512)
UNET_SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
UNET_SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True,
                 down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                 up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"])
# family: (text encoders as (with projection?, config), VAE, UNet, resolution, batch)
FAMILIES = {"sd15": ([(False, CLIP_L)], VAE, UNET_SD15, 512, 1),
            "sdxl": ([(False, CLIP_L), (True, BIG_G)], dict(VAE, sample_size=1024), UNET_SDXL, 1024, 1)}
KNOWN_M = {"unet sd15": 860, "unet sdxl": 2567, "text CLIP-L": 123, "text bigG": 695, "vae encoder": 34}
# The shape of the run behind the README's "2.1x diffusers" (docs/benchmarks.md, "Against diffusers' script":
# "same machine and shapes as" its throughput run): a 19.4 M UNet, a 12-layer 768-wide CLIP, VAE factor 8.
BENCH_FLAGS = "--unet_channels 64,128,256 --layers_per_block 2 --cross_attention_dim 768 --vae_channels 32,64,64,64"


def tiny_family(tmp, flags):
    """The teacher vs_diffusers.py builds from these shape flags (at 128 px, batch 4: its defaults), as configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    parser = argparse.ArgumentParser()
    add_shape_flags(parser, "64,128,256")  # vs_diffusers.py's default --unet_channels
    folder = build_teacher(tmp, resolve_shape(parser.parse_args(flags.split())), 128)
    text = CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder")).to_dict()
    return ([(False, text)], dict(AutoencoderKL.load_config(os.path.join(folder, "vae"))),
            dict(UNet2DConditionModel.load_config(os.path.join(folder, "unet"))), 128, 4)


def build(spec, device):
    """The family's models on `device`: text encoders, VAE, teacher UNet, student UNet (teacher + w-embedding)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_specs, vae_cfg, unet_cfg, _, _ = spec
    clean = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    with torch.device(device):
        texts = [(CLIPTextModelWithProjection if proj else CLIPTextModel)(CLIPTextConfig(**cfg)).eval()
                 for proj, cfg in text_specs]
        vae = AutoencoderKL.from_config(clean(vae_cfg)).eval()
        student = UNet2DConditionModel.from_config(dict(clean(unet_cfg), time_cond_proj_dim=W_EMBED)).train()
        # Called without timestep_cond the student skips cond_proj and runs the teacher's ops: on a real device it
        # stands in for the teacher (SD 1.5: 3.4 GB less); on meta a teacher of its own gives the parameter count.
        teacher = UNet2DConditionModel.from_config(clean(unet_cfg)).eval() if device == "meta" else student
    return texts, vae, teacher, student


def step_parts(models, spec, device):
    """{part: callable} running each part of one training step on a batch, as lcm_utils.objectives.lcd_loss does."""
    texts, vae, teacher, student = models
    _, _, _, resolution, batch = spec
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.randn(batch, 4, resolution // factor, resolution // factor, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    ids = torch.randint(0, 500, (batch, 77), device=device)
    cond = {"encoder_hidden_states": torch.randn(batch, 77, student.config.cross_attention_dim, device=device)}
    if student.config.addition_embed_type == "text_time":
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, texts[-1].config.projection_dim, device=device),
                                     "time_ids": torch.randn(batch, 6, device=device)}
    w_emb = torch.randn(batch, W_EMBED, device=device)
    pixels = torch.randn(batch, 3, resolution, resolution, device=device)
    both = {k: ({kk: torch.cat([vv, vv]) for kk, vv in v.items()} if isinstance(v, dict) else torch.cat([v, v]))
            for k, v in cond.items()}  # cond and uncond stacked: the teacher's one batched pass

    def student_step():
        student.zero_grad(set_to_none=True)
        student(z, t, timestep_cond=w_emb, **cond).sample.float().square().mean().backward()

    no_grad = torch.no_grad()
    # The unconditional text embedding is encoded once per run (StableDiffusion.unconditional_text), so not here.
    return {"text encoders": no_grad(lambda: [enc(ids, output_hidden_states=True) for enc in texts]),
            "VAE encode": no_grad(lambda: vae.encode(pixels).latent_dist.sample()),
            "student fwd+bwd": student_step,
            "teacher 2 fwd": no_grad(lambda: teacher(torch.cat([z, z]), torch.cat([t, t]), **both)),
            "target 1 fwd": no_grad(lambda: student(z, t, timestep_cond=w_emb, **cond))}


def count(spec):
    """{part: (FLOPs of the family's batch, {op: FLOPs})}, counted on meta tensors (no memory, no compute)."""
    # Meta also matters for attention: on CPU tensors SDPA runs _scaled_dot_product_flash_attention_for_cpu, which
    # FlopCounterMode (torch 2.13) does not count; on meta it decomposes to the bmm + softmax math, which it does.
    counted = {}
    for part, fn in step_parts(build(spec, "meta"), spec, "meta").items():
        with FlopCounterMode(display=False) as counter:
            fn()
        counted[part] = counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counted


def seconds(parts, repeats=3):
    """Fastest of `repeats` runs of each part, interleaved so a busy machine's drift hits every part alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = dict.fromkeys(parts, float("inf"))
    for round_ in range(repeats + 1):  # round 0 warms up allocator and kernel caches
        for part, fn in parts.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                best[part] = min(best[part], time.perf_counter() - start)
    return best


def table(title, per_sample, unit, flops=None):
    """Print per-sample figures and their shares (beside the FLOP shares at the same shape); returns them."""
    share = lambda d, part: 100 * d[part] / sum(d.values())  # noqa: E731
    enc = lambda d: share(d, "text encoders") + share(d, "VAE encode")  # noqa: E731
    rows = [(part, f"{value:,.3f}", f"{share(per_sample, part):.1f}%", flops and f"{share(flops, part):.1f}%")
            for part, value in per_sample.items()]
    rows = [("part", f"{unit} / sample", "share", flops and "FLOP share"), ("---", "---:", "---:", "---:")] + rows
    print(f"\n{title}\n")
    for row in rows + [("total", f"{sum(per_sample.values()):,.3f}", "100%", "100%")]:
        print("| " + " | ".join(row[:4 if flops else 3]) + " |")
    print(f"\nencoders' share (text + VAE): {enc(per_sample):.1f}%" + (f" (FLOPs: {enc(flops):.1f}%)" if flops else ""))
    return {"per_sample": per_sample, "total": sum(per_sample.values()), "encoders_share": enc(per_sample) / 100}


def params(name, models):
    """Parameter counts (millions) of the built models, next to the published ones."""
    texts, vae, teacher, _ = models
    size = lambda *mods: sum(p.numel() for m in mods for p in m.parameters()) / 1e6  # noqa: E731
    rows = {f"unet {name}": size(teacher), "vae encoder": size(vae.encoder, vae.quant_conv)}
    for enc in texts:
        rows[{768: "text CLIP-L", 1280: "text bigG"}.get(enc.config.hidden_size, "text")] = size(enc)
    for key, value in rows.items():
        known = f" (published ~{KNOWN_M[key]}M)" if key in KNOWN_M and name != "tiny" else ""
        print(f"params {key}: {value:,.2f}M{known}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["tiny", "sd15", "sdxl"], choices=["tiny", "sd15", "sdxl"])
    parser.add_argument("--tiny_flags", default=BENCH_FLAGS, help="vs_diffusers.py shape flags of the tiny row.")
    parser.add_argument("--json", help="Write the figures here.")
    parser.add_argument("--time", action="store_true", help="Also time the parts, random weights, GPU if any "
                        "(on a shared CPU, OMP_NUM_THREADS=1 avoids thread thrashing).")
    parser.add_argument("--time_families", nargs="+", default=["tiny", "sd15"], help="--time: these (tiny at its "
                        "benchmark shape, the others at --time_resolution and --time_batch).")
    parser.add_argument("--time_resolution", type=int, default=256)
    parser.add_argument("--time_batch", type=int, default=1)
    args = parser.parse_args()
    results = {}  # per family: the FLOP table, params, per-op FLOPs and, with --time, the timed table
    with tempfile.TemporaryDirectory() as tmp:
        specs = {name: tiny_family(tmp, args.tiny_flags) if name == "tiny" else FAMILIES[name]
                 for name in args.families}
    for name, spec in specs.items():
        print(f"\n## {name}: {spec[3]} px, batch {spec[4]}: FLOPs by FlopCounterMode on the meta device")
        counted = count(spec)
        gflops = {part: flops / spec[4] / 1e9 for part, (flops, _) in counted.items()}
        results[name] = dict(table(f"{name}: GFLOPs per sample", gflops, "GFLOPs"),
                             params=params(name, build(spec, "meta")), resolution=spec[3], batch=spec[4],
                             ops={part: ops for part, (_, ops) in counted.items()})
        fwd = gflops["target 1 fwd"]
        print(f"student backward / forward FLOPs: {(gflops['student fwd+bwd'] - fwd) / fwd:.2f}")
        if args.time and name in args.time_families:
            spec = spec if name == "tiny" else spec[:3] + (args.time_resolution, args.time_batch)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            torch.manual_seed(0)
            parts = step_parts(build(spec, device), spec, device)
            timed = {part: sec / spec[4] for part, sec in seconds(parts).items()}
            flops_here = {part: flops for part, (flops, _) in count(spec).items()}
            results[name]["time"] = dict(table(
                f"{name}: fp32 {device} seconds per sample at {spec[3]} px, batch {spec[4]} "
                f"({torch.get_num_threads()} threads), fastest of 3", timed, "s", flops_here), resolution=spec[3])
    print("\nFLOPs are not time. Counted: matmuls, convolutions, attention. Not counted: norms, activations, "
          "softmax,\nresampling (memory-bound, so they cost time beyond their FLOPs); kernels also differ in "
          "efficiency\n(backward, small matmuls, per-op overhead on small models): --time measures time shares. Not "
          "per sample:\nthe unconditional text embedding (encoded once per run). Precomputed shards drop both "
          "encoders.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
