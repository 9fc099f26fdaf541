#!/usr/bin/env python
"""Peak memory of LCM-LoRA (one shared UNet), full distillation, and LoRA with a second teacher copy.

    python benchmarks/lora_memory.py                      # builds a small SD-shaped teacher, CPU or GPU
    python benchmarks/lora_memory.py --teacher /models/sd15 --resolution 512 --train_batch_size 4
    python benchmarks/lora_memory.py --sd15_shape --resolution 512 --mixed_precision fp16   # SD 1.5 shapes, random
    python benchmarks/lora_memory.py --sdxl_shape --resolution 1024 --mixed_precision fp16  # SDXL shapes, random
    python benchmarks/lora_memory.py --sd35_large_shape --resolution 1024 --mixed_precision bf16 \
        --configs lora lora_second_teacher                                  # SD3.5 Large shapes, random, no T5

Each configuration runs a few training steps in its own process; the peak is the CUDA peak allocation on a
GPU, else the process's peak resident memory (which includes the Python interpreter and libraries, about
the same in every row). The third row is what diffusers' SD LoRA script does: a separate teacher UNet.
samples/s is the batch over the median time between optimizer steps after the first (the whole real step:
data, VAE and text encoding, the three UNet passes, the update); give --steps 5 or more for it to mean much.
"""

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = ("lora", "full", "lora_second_teacher")
# --sd15_shape: Stable Diffusion 1.5's UNet, CLIP ViT-L text encoder width/depth and VAE, randomly initialised.
SD15_SHAPE = dict(unet_channels="320,640,1280,1280", layers_per_block=2, cross_attention_dim=768,
                  vae_channels="128,256,512,512")
TINY_SHAPE = dict(layers_per_block=1, cross_attention_dim=32, vae_channels="32,64")  # lcm_utils.tiny's
# --sdxl_shape: the component configs of stabilityai/stable-diffusion-xl-base-1.0, written out in the repo.
SDXL_CONFIGS = os.path.join(ROOT, "benchmarks", "configs", "sdxl")
SD35_LARGE_CONFIGS = os.path.join(ROOT, "benchmarks", "configs", "sd35_large")


def add_shape_flags(parser, default_channels):
    """Flags of the teacher built in code when --teacher is not given (shared with teacher_batching.py)."""
    parser.add_argument("--unet_channels", default=default_channels, help="Width of the built teacher's UNet levels.")
    parser.add_argument("--layers_per_block", type=int, default=TINY_SHAPE["layers_per_block"],
                        help="Built teacher: ResNet/attention layers per UNet (and VAE) level (SD: 2).")
    parser.add_argument("--cross_attention_dim", type=int, default=TINY_SHAPE["cross_attention_dim"],
                        help="Built teacher: text width (SD 1.x: 768); other than 32 builds a 12-layer CLIP of it.")
    parser.add_argument("--text_layers", type=int, default=12,
                        help="Built teacher: layers of the CLIP text encoder built for --cross_attention_dim (SD: 12; "
                             "fewer gives a benchmark model SD 1.5's small text-encoder share of the step).")
    parser.add_argument("--vae_channels", default=TINY_SHAPE["vae_channels"],
                        help="Built teacher: VAE level widths; latents are resolution / 2**(levels - 1) (SD: 8).")
    parser.add_argument("--sd15_shape", action="store_true",
                        help="Build an SD 1.5-shaped teacher (random weights): "
                        + ", ".join(f"--{k} {v}" for k, v in SD15_SHAPE.items()))


def resolve_shape(args):
    if args.sd15_shape:
        for key, value in SD15_SHAPE.items():
            setattr(args, key, value)
    args.unet_channels = [int(c) for c in str(args.unet_channels).split(",")]
    args.vae_channels = [int(c) for c in str(args.vae_channels).split(",")]
    return args


def vae_factor(args):
    return 2 ** (len(args.vae_channels) - 1)


def build_unet(args, resolution):
    """The teacher UNet of the given shape (random weights); the down/up block layout is SD's."""
    from diffusers import UNet2DConditionModel

    levels = len(args.unet_channels)
    return UNet2DConditionModel(
        sample_size=resolution // vae_factor(args), in_channels=4, out_channels=4,
        layers_per_block=args.layers_per_block, block_out_channels=tuple(args.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=args.cross_attention_dim, attention_head_dim=8, norm_num_groups=32)


def sdxl_config(name, config_dir=SDXL_CONFIGS):
    with open(os.path.join(config_dir, f"{name}_config.json")) as f:
        return {k: v for k, v in json.load(f).items() if k not in ("_class_name", "architectures")}


def build_sdxl_shaped_teacher(out_dir, config_dir=SDXL_CONFIGS):
    """A diffusers SDXL folder with SDXL's exact component shapes and random weights; the text encoders take the
    project's character vocabulary (514 tokens instead of 49,408: no tokenizer download)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lcm_utils.tiny import char_tokenizer, write_char_vocab

    torch.manual_seed(0)
    text = {}
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        config = dict(sdxl_config(name, config_dir), vocab_size=514, bos_token_id=512, eos_token_id=513,
                      pad_token_id=513)
        text[name] = cls(CLIPTextConfig(**config))
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_config(sdxl_config("vae", config_dir)), tokenizer=char_tokenizer(),
        tokenizer_2=char_tokenizer(), unet=UNet2DConditionModel.from_config(sdxl_config("unet", config_dir)),
        scheduler=EulerDiscreteScheduler.from_config(sdxl_config("scheduler", config_dir)), add_watermarker=False,
        **text)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        write_char_vocab(os.path.join(out_dir, folder))
    return out_dir


def build_sd3_shaped_teacher(out_dir, config_dir=SD35_LARGE_CONFIGS):
    """A diffusers SD3 folder with the shapes of `config_dir` (SD3.5 Large's) and random weights, stored in bf16
    (8.1 B fp32 parameters would be 32 GB on disk), without T5; character-vocabulary CLIPs as for SDXL."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lcm_utils.tiny import char_tokenizer, write_char_vocab

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an fp32 copy of the transformer alone is 32 GB
    try:
        text = {name: CLIPTextModelWithProjection(CLIPTextConfig(**dict(
            sdxl_config(name, config_dir), vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513)))
            for name in ("text_encoder", "text_encoder_2")}
        transformer = SD3Transformer2DModel.from_config(sdxl_config("transformer", config_dir))
    finally:
        torch.set_default_dtype(default)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=AutoencoderKL.from_config(sdxl_config("vae", config_dir)),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(sdxl_config("scheduler", config_dir)),
        tokenizer=char_tokenizer(), tokenizer_2=char_tokenizer(), text_encoder_3=None, tokenizer_3=None, **text)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        write_char_vocab(os.path.join(out_dir, folder))
    return out_dir


def stored_parameters(folder):
    """Parameters in a model folder's safetensors files, read from their headers (nothing is loaded)."""
    import glob
    import math

    from safetensors import safe_open

    total = 0
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def build_teacher(out_dir, args, resolution):
    """lcm_utils.tiny's teacher (tokenizer, scheduler, layout); UNet, text encoder and VAE replaced when the
    shape flags differ from the tiny one. The replaced parts are saved over the tiny ones."""
    from lcm_utils.tiny import build_tiny_teacher

    tiny = (args.layers_per_block == TINY_SHAPE["layers_per_block"]
            and args.cross_attention_dim == TINY_SHAPE["cross_attention_dim"]
            and args.vae_channels == [int(c) for c in TINY_SHAPE["vae_channels"].split(",")])
    if tiny:
        return build_tiny_teacher(out_dir, unet_channels=args.unet_channels)
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    build_tiny_teacher(out_dir)  # the smallest UNet: it is replaced
    torch.manual_seed(0)
    build_unet(args, resolution).save_pretrained(os.path.join(out_dir, "unet"), safe_serialization=True)
    dim = args.cross_attention_dim
    if dim != TINY_SHAPE["cross_attention_dim"]:  # CLIP ViT-L/14's text tower at this width
        CLIPTextModel(CLIPTextConfig(
            vocab_size=514, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=args.text_layers,
            num_attention_heads=max(1, dim // 64), max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
            pad_token_id=513, projection_dim=dim)).save_pretrained(os.path.join(out_dir, "text_encoder"))
    levels = len(args.vae_channels)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(args.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=args.layers_per_block, norm_num_groups=32, sample_size=resolution,
    ).save_pretrained(os.path.join(out_dir, "vae"), safe_serialization=True)
    return out_dir


def add_teacher_flags(parser, default_channels):
    """--teacher, or the shape of a teacher to build: the shape flags and --sdxl_shape (used with teacher_for)."""
    parser.add_argument("--teacher", default=None, help="Teacher folder (default: build one from the shape flags).")
    add_shape_flags(parser, default_channels)
    parser.add_argument("--sdxl_shape", action="store_true",
                        help="Build an SDXL-shaped teacher (random weights) from benchmarks/configs/sdxl.")
    parser.add_argument("--sd35_large_shape", action="store_true",
                        help="Build an SD3.5 Large-shaped teacher (random weights, no T5) from "
                             "benchmarks/configs/sd35_large.")


def peak_memory():
    """(bytes, what they are): the CUDA peak allocation on a GPU, else the process's peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "CUDA peak allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"


def teacher_for(args, tmp):
    """--teacher, else a teacher built in `tmp` from --sdxl_shape or the shape flags."""
    if args.teacher:
        return args.teacher
    if args.sdxl_shape:
        return build_sdxl_shaped_teacher(os.path.join(tmp, "teacher"))
    if getattr(args, "sd35_large_shape", False):
        return build_sd3_shaped_teacher(os.path.join(tmp, "teacher"))
    return build_teacher(os.path.join(tmp, "teacher"), args, args.resolution)


def worker(kind, train_args):
    """Run a few training steps of one configuration in this process; print its peak memory as JSON."""
    import lcm_utils.training.loop as training
    from lcm_utils.training import main
    from train_lcm_distill import FullDistillation
    from train_lcm_lora import LoraDistillation

    step_times = []

    class NoExport:
        """Skip writing the final weights: only the training peak is measured (an SD UNet pair is 7 GB); time
        each optimizer step (the logged loss's .item() synchronises a GPU once a step)."""

        def export(self, output_dir, weights):
            return ""

        def update_target(self, gate=None):
            super().update_target(gate)
            step_times.append(time.perf_counter())

    class Lora(NoExport, LoraDistillation):
        pass

    class Full(NoExport, FullDistillation):
        pass

    class LoraWithSecondTeacher(Lora):
        """The diffusers LoRA script's layout: the teacher pass runs on its own copy of the UNet."""

        def build(self, teacher, args, weight_dtype):
            self.teacher_copy = copy.deepcopy(teacher.denoiser)
            if args.cast_teacher_unet:  # as diffusers casts its teacher copy
                self.teacher_copy.to(dtype=weight_dtype)
            super().build(teacher, args, weight_dtype)

        def teacher_forward(self, z, t, cond):
            z, cond = self.inputs(self.teacher_copy.dtype, z, cond)
            return self.family.denoise(self.teacher_copy, z, t, cond)

    method = {"lora": Lora, "full": Full, "lora_second_teacher": LoraWithSecondTeacher}[kind]
    # No final checkpoint either: full distillation at SDXL's shapes would write 41 GB (weights, target, Adam).
    training.save_checkpoint = lambda *args, **kwargs: None
    main(method, kind, train_args)
    peak, unit = peak_memory()
    intervals = sorted(b - a for a, b in zip(step_times[1:], step_times[2:]))
    batch = int(train_args[train_args.index("--train_batch_size") + 1])
    samples_per_s = batch / intervals[len(intervals) // 2] if intervals else None
    print("RESULT " + json.dumps({"kind": kind, "peak_bytes": peak, "unit": unit, "samples_per_s": samples_per_s}),
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_flags(parser, "128,256,512")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                        help="Which rows to run (full distillation of SD3.5 Large does not fit one 141 GB GPU).")
    args = resolve_shape(parser.parse_args())

    from lcm_utils.tiny import build_image_folder

    with tempfile.TemporaryDirectory() as tmp:
        teacher = teacher_for(args, tmp)
        images = build_image_folder(os.path.join(tmp, "images"), num_images=16, size=args.resolution)
        results = {}
        for kind in args.configs:
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
        from lcm_utils.families import family_at

        family = family_at(teacher)
        n_params = stored_parameters(os.path.join(teacher, family.denoiser_folder))
        with open(os.path.join(teacher, "vae", "config.json")) as f:
            latent = args.resolution // 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    unit = next(iter(results.values()))["unit"]
    # "UNet parameters" keeps the line gpu_check.sh greps for; the denoiser is named after it.
    print(f"UNet parameters: {n_params / 1e6:.1f} M ({family.denoiser_class_name}); batch {args.train_batch_size} at "
          f"{args.resolution} px ({latent}x{latent} latents); LoRA rank {args.lora_rank}; mixed precision "
          f"{args.mixed_precision}; {unit}")
    versus = "vs LoRA" if args.configs[0] == "lora" else f"vs {args.configs[0]}"
    print(f"{'configuration':<24}{'peak MiB':>12}{versus:>10}{'samples/s':>12}")
    base = results[args.configs[0]]["peak_bytes"]
    for kind in args.configs:
        peak, speed = results[kind]["peak_bytes"], results[kind]["samples_per_s"]
        speed = f"{speed:.2f}" if speed else "-"
        print(f"{kind:<24}{peak / 2**20:>12.0f}{peak / base:>10.2f}{speed:>12}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # internal: one configuration, the rest are training flags
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
