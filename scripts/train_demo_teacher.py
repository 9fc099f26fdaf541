#!/usr/bin/env python
"""Train the shipped demo teacher: a small SD-shaped text-to-image model of coloured shapes (lcm_utils.shapes).

    python scripts/train_demo_teacher.py --out assets/shapes-teacher            # the shipped weights
    python scripts/train_demo_teacher.py --out /tmp/t --vae_steps 50 --unet_steps 50   # a smoke run

Parts, as in Stable Diffusion: an AutoencoderKL (32x32 pixels -> 4x16x16 latents) trained for reconstruction;
a 2-layer CLIP text encoder with a character-level vocabulary (no tokenizer download) trained from scratch
jointly with the UNet, as LDM trained its text transformer (`--freeze_text_encoder` keeps it at its random
initialisation instead); a UNet2DConditionModel trained for epsilon prediction with caption dropout (so
classifier-free guidance works). EMAs of the trained weights are what is saved.
The result is a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads. At the end it samples
held-out prompts with 50 DDIM steps and CFG, judges them with `lcm_utils.shapes.classify`, and writes the
figures, the command and the wall times to `<out>/training_log.json` and a grid to `<out>/samples.png`.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcm_utils import shapes  # noqa: E402
from lcm_utils.evaluation import to_pixels  # noqa: E402
from lcm_utils.families.sd3 import T5_TOKENS  # noqa: E402
from lcm_utils.tiny import SD_SCHEDULER, char_tokenizer, write_char_vocab  # noqa: E402


def build_parts(seed, text_width=64):
    """Untrained tokenizer, text encoder, VAE and UNet of the demo teacher's shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        projection_dim=text_width))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=16, sample_size=shapes.IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=shapes.IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=32)
    return tokenizer, text_encoder, vae, unet


def build_sd3_parts(seed, text_width=64, width=128, layers=6):
    """Untrained parts of the SD3-shaped demo teacher: two CLIPs with projections (CLIP-L and CLIP-G's roles, the
    second wider), no T5 (the pipeline's zeros stand in), a 16-channel VAE, an SD3Transformer2DModel."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from lcm_utils.tiny import tiny_clip

    encoders = (tiny_clip(text_width, text_width, with_projection=True, seed=seed),
                tiny_clip(text_width + 32, text_width, with_projection=True, seed=seed + 1))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=16, sample_size=shapes.IMAGE_SIZE, use_quant_conv=False,
        use_post_quant_conv=False)
    heads = width // 32
    transformer = SD3Transformer2DModel(
        sample_size=shapes.IMAGE_SIZE // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=32, num_attention_heads=heads, joint_attention_dim=2 * text_width + 32,
        caption_projection_dim=width, pooled_projection_dim=2 * text_width, pos_embed_max_size=shapes.IMAGE_SIZE // 4)
    return (char_tokenizer(), char_tokenizer()), encoders, vae, transformer


def sd3_text(encoders, ids, t5_tokens, joint_dim):
    """Prompt ids [P, 77] -> (embeds [P, 77 + t5_tokens, J], pooled [P, P1 + P2]) as StableDiffusion3Pipeline
    builds them without T5 (penultimate CLIP states, zero-padded to J, then T5's zeros), with gradients."""
    outs = [encoder(ids, output_hidden_states=True) for encoder in encoders]
    clip = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    zeros = clip.new_zeros(len(ids), t5_tokens, joint_dim)
    return torch.cat([clip, zeros], dim=-2), torch.cat([out[0] for out in outs], dim=-1)


def cosine_lr(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_vae(vae, pixels, args, device, log):
    """Reconstruction (MSE) with a small KL term, as SD's autoencoder is a lightly regularised KL-VAE."""
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.vae_steps, 100))
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.vae_steps):
        x = pixels[torch.randint(len(pixels), (args.batch_size,), generator=g)].to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.mse_loss(recon, x) + args.kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def posterior(vae, pixels, device, chunk=512):
    """Pixels -> (mean, std) of the VAE posterior, each [N, 4, h, w], on CPU."""
    means, stds = [], []
    for x in pixels.split(chunk):
        dist = vae.encode(x.to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def psnr(vae, pixels, device):
    mean, _ = posterior(vae, pixels, device)
    recon = torch.cat([vae.decode(m.to(device)).sample.cpu() for m in mean.split(512)]).clamp(-1, 1)
    mse = F.mse_loss(recon, pixels).item()
    return 10 * math.log10(4.0 / mse)  # peak-to-peak 2 in [-1, 1]


def ddpm_corruption(device):
    """SD's objective: z_t on the DDPM forward process at a uniform train step, epsilon as the target."""
    from diffusers import DDIMScheduler

    acp = DDIMScheduler(**SD_SCHEDULER).alphas_cumprod.to(device)

    def corrupt(z0, g):
        t = torch.randint(0, len(acp), (len(z0),), generator=g, device=z0.device)
        noise = torch.randn(z0.shape, generator=g, device=z0.device)
        a = acp[t].view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise
    return corrupt


def flow_corruption(shift):
    """SD3's objective (arXiv 2403.03206, sec. 3.1): z_t = (1 - sigma) z0 + sigma eps with u logit-normal(0, 1) and
    sigma its shift, the velocity eps - z0 as the target; the denoiser takes t = 1000 sigma."""
    def corrupt(z0, g):
        u = torch.sigmoid(torch.randn(len(z0), generator=g, device=z0.device))
        noise = torch.randn(z0.shape, generator=g, device=z0.device)
        sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1)
        return (1 - sigma) * z0 + sigma * noise, sigma.flatten() * 1000, noise - z0
    return corrupt


def train_denoiser(denoiser, text_encoders, latents, caption_ids, prompt_ids, args, device, log, encode, corrupt,
                   predict):
    """The denoiser's objective (`corrupt` gives z_t, t and the target), CFG dropout, EMA of the weights (the EMAs
    are returned). `encode(encoders, prompt_ids)` -> per-prompt condition tensors; `predict(denoiser, z_t, t,
    conditions)` -> the output. `prompt_ids` [P, 77] tokenizes every distinct caption, the empty prompt last;
    `caption_ids` [N] index it."""
    mean, std = (t.to(device) for t in latents)
    # The text encoders learn with the denoiser (as LDM's transformer did) unless --freeze_text_encoder: frozen
    # random ones leave the colour words hard to tell apart, and the teacher then follows prompts poorly.
    trained = [] if args.freeze_text_encoder else [e.to(device).train() for e in text_encoders]
    models = [denoiser.to(device).train()] + trained
    emas = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
    params = [q for m in models for q in m.parameters()]
    ema_params = [q for m in emas for q in m.parameters()]
    for encoder in text_encoders:
        encoder.to(device).requires_grad_(not args.freeze_text_encoder)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    prompt_ids = prompt_ids.to(device)
    if args.freeze_text_encoder:
        with torch.no_grad():
            table = encode(text_encoders, prompt_ids)
    started = time.time()

    def progress(step):  # with --unet_minutes the cosine decay also ends when the time is up
        done = step / args.unet_steps
        if args.unet_minutes:
            done = max(done, (time.time() - started) / (60 * args.unet_minutes))
        return min(done, 1.0)

    g = torch.Generator(device).manual_seed(args.seed)
    uncond = len(prompt_ids) - 1
    for step in range(args.unet_steps):
        idx = torch.randint(len(mean), (args.batch_size,), generator=g, device=device)
        sample = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=device)
        z0 = (sample - args.shift_factor) * args.scaling_factor
        cap = caption_ids[idx]
        drop = torch.rand(len(idx), generator=g, device=device) < args.caption_dropout
        cap = torch.where(drop, torch.full_like(cap, uncond), cap)
        z_t, t, target = corrupt(z0, g)
        if not args.freeze_text_encoder:
            table = encode(text_encoders, prompt_ids)
        loss = F.mse_loss(predict(denoiser, z_t, t, [c[cap] for c in table]), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * cosine_lr(progress(step + 1) * args.unet_steps, args.unet_steps, args.warmup_steps)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # warm EMA so short runs are usable
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 1000 == 0 or step == args.unet_steps - 1:
            log(f"denoiser step {step} loss {loss.item():.5f}")
        if progress(step + 1) >= 1.0 and step + 1 < args.unet_steps:
            log(f"denoiser stopped by --unet_minutes at step {step + 1} of {args.unet_steps}")
            break
    encoders = emas[1:] if trained else list(text_encoders)
    return emas[0], [e.eval().requires_grad_(False) for e in encoders]


def grid(images, cols):
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // cols)
    out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


FAMILY_FLAGS = {"sd": "an SD-shaped teacher (UNet, one CLIP, DDPM, epsilon)",
                "sd3": "an SD3-shaped teacher (MMDiT, two CLIPs without T5, flow matching)"}


def load_parts(folder, family):
    """(tokenizers, text encoders, VAE, denoiser) of a teacher folder this script wrote, to train on."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family == "sd3":
        names = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
        denoiser = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
        encoder_cls = CLIPTextModelWithProjection
    else:
        names, encoder_cls = (("tokenizer", "text_encoder"),), CLIPTextModel
        denoiser = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    tokenizers = tuple(CLIPTokenizer.from_pretrained(folder, subfolder=t) for t, _ in names)
    encoders = tuple(encoder_cls.from_pretrained(folder, subfolder=e) for _, e in names)
    return tokenizers, encoders, AutoencoderKL.from_pretrained(folder, subfolder="vae"), denoiser


def objective(args, joint_dim=None):
    """(encode, corrupt, predict) of train_denoiser for the family."""
    if args.family == "sd3":
        def predict(transformer, z_t, t, conditions):
            return transformer(hidden_states=z_t, timestep=t, encoder_hidden_states=conditions[0],
                               pooled_projections=conditions[1]).sample
        return (lambda encoders, ids: sd3_text(encoders, ids, T5_TOKENS, joint_dim), flow_corruption(args.shift),
                predict)
    return (lambda encoders, ids: (encoders[0](ids)[0],), ddpm_corruption(args.device),
            lambda unet, z_t, t, conditions: unet(z_t, t, conditions[0]).sample)


def save_teacher(args, tokenizers, encoders, vae, denoiser):
    """The diffusers folder, as the family's stock pipeline saves it; returns the pipeline class."""
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                           StableDiffusionPipeline)

    if args.family == "sd3":
        pipe = StableDiffusion3Pipeline(
            transformer=denoiser.cpu(), scheduler=FlowMatchEulerDiscreteScheduler(shift=args.shift), vae=vae.cpu(),
            text_encoder=encoders[0].cpu(), tokenizer=tokenizers[0], text_encoder_2=encoders[1].cpu(),
            tokenizer_2=tokenizers[1], text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae.cpu(), text_encoder=encoders[0].cpu(), tokenizer=tokenizers[0], unet=denoiser.cpu(),
            scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.save_pretrained(args.out, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2")[:len(tokenizers)]:
        write_char_vocab(os.path.join(args.out, folder))
    return type(pipe)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sd", choices=tuple(FAMILY_FLAGS),
                   help="; ".join(f"{k}: {v}" for k, v in FAMILY_FLAGS.items()) + " (default sd).")
    p.add_argument("--shift", type=float, default=3.0, help="sd3: the flow schedule's shift (SD3's is 3).")
    p.add_argument("--width", type=int, default=128, help="sd3: the transformer's width (32 per head).")
    p.add_argument("--layers", type=int, default=6, help="sd3: the transformer's blocks.")
    p.add_argument("--out", default="assets/shapes-teacher")
    p.add_argument("--num_train", type=int, default=8000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--unet_steps", type=int, default=12000)
    p.add_argument("--unet_minutes", type=float, default=0, help="Also end the UNet's cosine schedule and training after this many minutes (0: steps only).")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=500)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--freeze_text_encoder", action="store_true", help="Keep the random CLIP frozen (SD-style).")
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--eval_prompts", type=int, default=256)
    p.add_argument("--guidance_scale", type=float, default=6.0, help="CFG scale of the check at the end.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init_from", default=None, help="A teacher folder this script wrote: keep its VAE, train on.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started = time.time()
    lines = []

    def log(msg):
        line = f"[{time.time() - started:7.1f}s] {msg}"
        print(line, flush=True)
        lines.append(line)

    previous = None
    if args.init_from:  # continue from an earlier run of this script: its VAE is kept, the rest trains on
        tokenizers, encoders, vae, denoiser = load_parts(args.init_from, args.family)
        with open(os.path.join(args.init_from, "training_log.json")) as f:
            previous = json.load(f)
        args.vae_steps = 0
    elif args.family == "sd3":
        tokenizers, encoders, vae, denoiser = build_sd3_parts(args.seed, width=args.width, layers=args.layers)
    else:
        tokenizer, text_encoder, vae, denoiser = build_parts(args.seed)
        tokenizers, encoders = (tokenizer,), (text_encoder,)
    images, captions = zip(*shapes.samples("train", args.num_train))
    pixels = to_pixels(images)
    heldout_images, heldout_captions = zip(*shapes.samples("heldout", args.eval_prompts))
    log(f"{len(pixels)} training images; vae {sum(q.numel() for q in vae.parameters())} params, "
        f"denoiser {sum(q.numel() for q in denoiser.parameters())} params, device {device}")

    t0 = time.time()
    if args.vae_steps:
        train_vae(vae, pixels, args, device, log)
    vae.to(device).eval().requires_grad_(False)
    vae_seconds = time.time() - t0
    vae_psnr = psnr(vae, to_pixels(heldout_images), device)
    mean, std = posterior(vae, pixels, device)
    if args.vae_steps:
        # SD's convention: scale latents to unit variance (SD 1.x's 0.18215 was measured the same way); SD3's VAE
        # also shifts them to zero mean first.
        sample = mean + std * torch.randn_like(mean)
        if args.family == "sd3":
            vae.register_to_config(shift_factor=float(sample.mean()))
        vae.register_to_config(scaling_factor=float(1.0 / (sample - (vae.config.shift_factor or 0.0)).std()))
    args.scaling_factor, args.shift_factor = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    log(f"vae done in {vae_seconds:.0f}s: held-out PSNR {vae_psnr:.2f} dB, scaling_factor {args.scaling_factor:.4f}, "
        f"shift_factor {args.shift_factor:.4f}")

    vocab = sorted(set(captions))
    prompt_ids = tokenizers[0](vocab + [""], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    caption_ids = torch.tensor([vocab.index(c) for c in captions], device=device)
    t0 = time.time()
    joint_dim = getattr(denoiser.config, "joint_attention_dim", None)
    ema, encoders = train_denoiser(denoiser, encoders, (mean, std), caption_ids, prompt_ids, args, device, log,
                                   *objective(args, joint_dim))
    unet_seconds = time.time() - t0
    log(f"denoiser done in {unet_seconds:.0f}s")
    pipeline_cls = save_teacher(args, tokenizers, encoders, vae, ema)

    # The check: reload from disk (the path users take), sample held-out prompts with the teacher's own sampler
    # (DDIM; flow-matching Euler for sd3), judge them.
    extra = {"text_encoder_3": None, "tokenizer_3": None} if args.family == "sd3" else {}
    pipe = pipeline_cls.from_pretrained(args.out, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    channels = vae.config.latent_channels
    latents = torch.randn(len(heldout_captions), channels, 16, 16, generator=torch.Generator().manual_seed(args.seed))
    out = pipe(list(heldout_captions), num_inference_steps=50, guidance_scale=args.guidance_scale,
               latents=latents.to(device), height=32, width=32).images
    scores = shapes.adherence(out, heldout_captions)
    log(f"{type(pipe.scheduler).__name__}-50, CFG {args.guidance_scale}, {len(out)} held-out prompts: {scores}")
    grid(out[:64], 8).resize((8 * 64, 8 * 64), 0).save(os.path.join(args.out, "samples.png"))
    record = dict(command="python " + " ".join(sys.argv), args=vars(args), device=str(device),
                  gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                  vae_seconds=round(vae_seconds, 1), unet_seconds=round(unet_seconds, 1),
                  total_seconds=round(time.time() - started, 1), vae_heldout_psnr_db=round(vae_psnr, 2),
                  ddim50_cfg_adherence=scores, log=lines, previous=previous)
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump(record, f, indent=1)
    log(f"saved {args.out}")


if __name__ == "__main__":
    main()
