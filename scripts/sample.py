#!/usr/bin/env python
"""Sample from a distilled model with a stock diffusers pipeline and the exported LCMScheduler."""

import argparse

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True, help="The teacher the model was distilled from (folder or id).")
    parser.add_argument("--model", required=True, help="The training output_dir.")
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance_scale", type=float, default=8.5, help="w + 1 in the LCM paper's terms.")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="sample.png")
    args = parser.parse_args()

    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    scheduler = LCMScheduler.from_pretrained(args.model, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher, unet=unet, scheduler=scheduler, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=size,
                 width=size, generator=torch.Generator().manual_seed(args.seed)).images[0]
    image.save(args.out)
    print(f"saved {args.out} ({args.steps} LCM steps, guidance_scale {args.guidance_scale})")


if __name__ == "__main__":
    main()
