"""Tiny Stable Diffusion teachers and toy datasets, built in code so tests and the demo run offline.

The teacher is saved in the diffusers folder layout (model_index.json, scheduler/, tokenizer/,
text_encoder/, vae/, unet/), so the trainer loads it through exactly the path a real SD checkpoint takes.
"""

import argparse
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image, ImageDraw

# SD 2.x ships a DDIMScheduler with this schedule; clip_sample False as SD ships it,
# otherwise DDPM/DDIM schedulers would clip x0 to [-1, 1].
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, trained_betas=None,
)
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def byte_symbols():
    """GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to chr(256 + n)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_char_vocab():
    """514-token character-level CLIP vocabulary: byte symbols, the same with </w>, then BOS/EOS."""
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_char_vocab(folder):
    """Write vocab.json + merges.txt of the character vocabulary (what the slow CLIPTokenizer loads from;
    transformers 5 saves only tokenizer.json)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(clip_char_vocab(), f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")


def char_tokenizer():
    """A CLIPTokenizer over the character vocabulary, built offline."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_char_vocab(tmp)
        return CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77)


def build_tiny_teacher(out_dir, prediction_type="epsilon", seed=0, time_cond_proj_dim=None,
                       unet_channels=(32, 64)):
    """Save a randomly initialised SD-style teacher (UNet `unet_channels` wide, 2-layer CLIP, 2-level VAE)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=32))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=32)
    levels = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim)
    scheduler = DDIMScheduler(prediction_type=prediction_type, **SD_SCHEDULER)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_char_vocab(os.path.join(out_dir, "tokenizer"))
    return out_dir


def tiny_clip(hidden_size=32, projection_dim=32, with_projection=False, seed=0):
    """A 2-layer CLIP text model over the character vocabulary (with a text projection: SDXL's second encoder)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=514, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, bos_token_id=512,
                            eos_token_id=513, pad_token_id=513, projection_dim=projection_dim)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_tiny_sdxl_teacher(out_dir, prediction_type="epsilon", seed=0, force_zeros_for_empty_prompt=True):
    """Save a randomly initialised SDXL-style teacher: two CLIP encoders of different widths (32 and 48, the
    second projecting to 24), a UNet with SDXL's text_time added embedding, the tiny VAE and SDXL's Euler
    scheduler config. No size is SDXL's, so nothing may be hard-coded."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    os.makedirs(out_dir, exist_ok=True)
    text_encoder = tiny_clip(32, 32, seed=seed)
    text_encoder_2 = tiny_clip(48, 24, with_projection=True, seed=seed + 1)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=32)
    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32 + 48, attention_head_dim=8, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + 24)
    scheduler = EulerDiscreteScheduler(prediction_type=prediction_type, timestep_spacing="leading",
                                       **{k: v for k, v in SD_SCHEDULER.items() if k in
                                          ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                           "steps_offset")})
    tokenizer = char_tokenizer()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=char_tokenizer(), unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        write_char_vocab(os.path.join(out_dir, folder))
    return out_dir


def tiny_t5(d_model=96, seed=0):
    """A 1-layer T5 encoder and a T5 tokenizer over a character vocabulary (no sentencepiece file needed)."""
    import string

    import torch
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in string.printable[:95]] + [
        ("\u2581", -1.0)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=256)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_ff=64, d_kv=8, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config)


def build_tiny_sd3_teacher(out_dir, seed=0, with_t5=True, dual_attention=False, shift=3.0):
    """Save a randomly initialised SD3-style teacher: CLIP-L and CLIP-G stand-ins of different widths (32 and 48,
    projecting to 32 and 24), an optional T5 (width 96), a 2-block SD3Transformer2DModel (with SD3.5 Medium's
    dual attention and RMS qk-norm when `dual_attention`), a 16-channel VAE with a shift factor, and the
    flow-matching Euler scheduler. No size is SD3's, so nothing may be hard-coded."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    os.makedirs(out_dir, exist_ok=True)
    text_encoder = tiny_clip(32, 32, with_projection=True, seed=seed)
    text_encoder_2 = tiny_clip(48, 24, with_projection=True, seed=seed + 1)
    tokenizer_3, text_encoder_3 = tiny_t5(96, seed=seed + 2) if with_t5 else (None, None)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=32 + 24,
        pos_embed_max_size=16, dual_attention_layers=(0,) if dual_attention else (),
        qk_norm="rms_norm" if dual_attention else None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=text_encoder, tokenizer=char_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=char_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        write_char_vocab(os.path.join(out_dir, folder))
    return out_dir


def build_tiny_clip_model(out_dir, image_size=16, seed=0):
    """A random CLIPModel (text and vision towers, 16 px images) with its processor, saved for from_pretrained: the
    CLIP score's model in benchmarks/evaluate.py's tests."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=514,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out_dir)
    pixels = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                "width": image_size})
    CLIPProcessor(image_processor=pixels, tokenizer=char_tokenizer()).save_pretrained(out_dir)
    return out_dir


def build_tiny_dinov2(out_dir, image_size=16, seed=0):
    """A random DINOv2 (transformers' Dinov2Model) with its image processor: the Frechet distance's feature model in
    benchmarks/evaluate.py's tests."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=image_size, patch_size=4)).save_pretrained(out_dir)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      do_convert_rgb=True).save_pretrained(out_dir)
    return out_dir


def toy_sample(index, size=32):
    """A deterministic (image, caption) pair: a coloured shape on a light background."""
    rng = np.random.default_rng(index)
    color = list(COLORS)[index % len(COLORS)]
    shape = SHAPES[(index // len(COLORS)) % len(SHAPES)]
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    lo, hi = int(rng.integers(2, size // 4)), int(rng.integers(3 * size // 4, size - 2))
    (draw.rectangle if shape == "square" else draw.ellipse)([lo, lo, hi, hi], fill=COLORS[color])
    return img, f"a {color} {shape}"


def build_image_folder(out_dir, num_images=16, size=32, captions="metadata"):
    """Write an image folder with captions in metadata.jsonl (HF imagefolder) or in .txt files."""
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(num_images):
        img, caption = toy_sample(i, size)
        name = f"{i:05d}.png"
        img.save(os.path.join(out_dir, name))
        if captions == "txt":
            with open(os.path.join(out_dir, f"{i:05d}.txt"), "w") as f:
                f.write(caption)
        rows.append({"file_name": name, "text": caption})
    if captions == "metadata":
        with open(os.path.join(out_dir, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return out_dir


def write_shard(path, samples, image_format="JPEG"):
    """Write one webdataset tar of (key, PIL image, caption[, json metadata]) samples as <key>.jpg|png +
    <key>.txt (+ <key>.json), under a temporary name renamed into place, so an interrupted write never leaves a
    truncated shard."""
    ext = {"JPEG": "jpg", "PNG": "png"}[image_format]
    with tarfile.open(path + ".partial", "w") as tar:
        for key, img, caption, *meta in samples:
            buf = io.BytesIO()
            img.save(buf, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
            members = [(f"{key}.{ext}", buf.getvalue()), (f"{key}.txt", caption.encode())]
            if meta:
                members.append((f"{key}.json", json.dumps(meta[0]).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(path + ".partial", path)


def laion_metadata(index):
    """LAION-style json of toy sample `index`: an original size (landscape or portrait), watermark and aesthetic
    scores that vary with the index, so filters and time ids have something to act on."""
    rng = np.random.default_rng(1000 + index)
    height, width = (int(v) for v in rng.integers(300, 1400, 2))
    return {"original_height": height, "original_width": width, "pwatermark": round(float(rng.random()), 3),
            "aesthetic": round(float(rng.uniform(3.0, 7.0)), 3)}


def build_wds_shards(out_dir, num_shards=2, per_shard=8, size=32, with_json=False):
    """Write webdataset shards {00000..} holding .jpg + .txt (+ LAION-style .json) samples; returns the pattern."""
    os.makedirs(out_dir, exist_ok=True)
    for s in range(num_shards):
        indices = range(s * per_shard, (s + 1) * per_shard)
        write_shard(os.path.join(out_dir, f"{s:05d}.tar"),
                    ((f"{s:05d}{i - s * per_shard:04d}", *toy_sample(i, size), *([laion_metadata(i)] if with_json
                                                                                 else [])) for i in indices))
    return os.path.join(out_dir, "{%05d..%05d}.tar" % (0, num_shards - 1))


def main():
    parser = argparse.ArgumentParser(description="Build a tiny SD teacher and a toy dataset for offline runs.")
    parser.add_argument("out_dir")
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--num_images", type=int, default=64)
    args = parser.parse_args()
    build_tiny_teacher(os.path.join(args.out_dir, "teacher"), args.prediction_type)
    build_image_folder(os.path.join(args.out_dir, "images"), args.num_images)
    print(os.path.join(args.out_dir, "teacher"), os.path.join(args.out_dir, "images"))


if __name__ == "__main__":
    main()
