"""Precomputed training samples: webdataset shards of VAE posteriors and text embeddings (lcm_utils.precompute).

A precomputed shard starts with a header sample (key `__precomputed__`): a JSON record of what wrote it (teacher
family, resolution, the VAE's and text encoders' configs, crop settings) and the unconditional text conditions
of the teacher's CFG. Every other sample holds
    KEY.safetensors  latent_mean, latent_std [C, h, w] (the VAE posterior, unscaled) and the text conditions
                     (encoder_hidden_states [77, D]; SDXL also text_embeds [P])
    KEY.txt          the caption (an empty caption is conditioned like the unconditional branch)
    KEY.json         original size and crop (SDXL's time ids), the source's pwatermark / aesthetic fields
The posterior's mean and std are stored, not one latent: training draws z0 = mean + std * eps at every visit,
as encoding on the fly does, so a sample seen in several epochs does not always bring the same latent.
"""

import hashlib
import io
import json
import tarfile

import torch

from .config import ConfigError, teacher_revision
from .data import HEADER_KEY, SampleRules, ShardSource, SkipSample, checked_caption, json_record, read_shard, text_caption

FORMAT = "lcm-precomputed/1"
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Source metadata kept in a precomputed sample's json, so the training filters still apply to it.
KEPT_METADATA = ("pwatermark", "aesthetic")


def config_fingerprint(config):
    """Short hash of a model config dict, without the keys that name files or library versions."""
    kept = {k: v for k, v in dict(config).items()
            if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def vae_source(args):
    """(path or id, subfolder) of the VAE a run uses."""
    if args.pretrained_vae_model_name_or_path:
        return args.pretrained_vae_model_name_or_path, None
    return args.pretrained_teacher_model, "vae"


def encoder_fingerprints(args, family_cls):
    """Fingerprints of the VAE's and each text encoder's config: read from the config files alone (no weights)."""
    from diffusers import AutoencoderKL
    from transformers import PretrainedConfig

    src = dict(revision=teacher_revision(args), cache_dir=args.cache_dir)
    vae_path, vae_sub = vae_source(args)
    vae_src = src if vae_sub else dict(cache_dir=args.cache_dir)
    vae = AutoencoderKL.load_config(vae_path, subfolder=vae_sub, **vae_src)
    texts = [PretrainedConfig.get_config_dict(args.pretrained_teacher_model, subfolder=folder, **src)[0]
             for _, folder in family_cls.text_parts]
    return {"vae_config": config_fingerprint(vae), "text_encoder_configs": [config_fingerprint(t) for t in texts],
            "scaling_factor": float(vae.get("scaling_factor", 0.18215))}


def header_record(args, family, latent_shape, storage_dtype, crops_per_image):
    """The JSON record of a precomputed shard's header."""
    vae_path, vae_sub = vae_source(args)
    return {"format": FORMAT, "family": family.name, "teacher": args.pretrained_teacher_model,
            "vae": vae_path + (f"/{vae_sub}" if vae_sub else ""), **encoder_fingerprints(args, type(family)),
            "resolution": args.resolution, "latent_shape": list(latent_shape), "center_crop": args.center_crop,
            "random_flip": args.random_flip, "interpolation_type": args.interpolation_type,
            "crops_per_image": crops_per_image, "storage_dtype": storage_dtype, "latent": "posterior mean and std",
            "force_zeros_for_empty_prompt": family.force_zeros}


def tensor_bytes(tensors):
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def bytes_tensors(data):
    from safetensors.torch import load

    return load(data)


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same samples give byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def write_header(tar, record, uncond_text):
    """The header sample: the record and the unconditional text conditions [1, ...] (fp32)."""
    add_member(tar, f"{HEADER_KEY}.json", json.dumps(record, sort_keys=True).encode())
    add_member(tar, f"{HEADER_KEY}.safetensors", tensor_bytes({k: v.float().cpu() for k, v in uncond_text.items()}))


def write_sample(tar, key, tensors, caption, meta):
    add_member(tar, f"{key}.safetensors", tensor_bytes(tensors))
    add_member(tar, f"{key}.txt", caption.encode("utf-8"))
    add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())


def read_header(url):
    """(record, unconditional text tensors) of a precomputed shard, or None for any other shard (its first sample
    is not a header). An unreadable shard gives None: the image reader then counts it as damaged."""
    found = next(read_shard(url, header=True), None)
    if not isinstance(found, dict):  # no header sample, or a damaged shard
        return None
    if "json" not in found:
        return None
    record = json.loads(found["json"])
    if record.get("format") != FORMAT:
        raise ConfigError(f"--train_shards_path_or_url: '{url}' was written by another version of "
                          f"lcm_utils.precompute ({record.get('format')}, this trainer reads {FORMAT}); rerun it")
    return record, bytes_tensors(found.get("safetensors", b""))


class LatentShardSource(ShardSource):
    """Shards written by lcm_utils.precompute: latents and text embeddings instead of images and captions. Read,
    shuffled, split and resumed exactly as image shards are; only decoding and the example differ."""

    def __init__(self, spec, header):
        super().__init__(spec)
        self.header, self.uncond_text = header

    def decode(self, sample):
        """((tensors, crop (top, left)), caption, reencoded, original (h, w)) of one precomputed sample, or
        SkipSample."""
        try:
            tensors = {k: v.float() for k, v in bytes_tensors(sample["safetensors"]).items()}
        except Exception:  # missing or not a safetensors file
            raise SkipSample("bad_latents") from None
        if "latent_mean" not in tensors or "latent_std" not in tensors:
            raise SkipSample("bad_latents")
        raw_caption, reencoded = text_caption(sample["txt"]) if "txt" in sample else (None, False)
        caption = checked_caption(raw_caption)
        meta = json_record(sample.get("json", b"{}"))
        rules = self.rules or SampleRules()
        rules.check_scores(meta)
        size = meta.get("original_size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise SkipSample("bad_size_metadata")
        rules.check_size(size)
        crop = tuple(int(v) for v in meta.get("crop_top_left", (0, 0)))
        return (tensors, crop), caption, reencoded, tuple(size)

    @staticmethod
    def example(decoded, transform, rng):
        """The training example: the stored posterior and text, the caption emptied with the same draw (and
        probability) an image example uses, so both streams drop the same prompts."""
        (tensors, crop), caption, size = decoded
        _, _, _, empty_draw, _ = rng.random(5)
        if empty_draw < transform.proportion_empty_prompts:
            caption = ""
        return {"latent_mean": tensors["latent_mean"], "latent_std": tensors["latent_std"],
                "text": {k: v for k, v in tensors.items() if not k.startswith("latent_")},
                "caption": caption, "original_size": size, "crop_top_left": crop}


def check_precomputed(record, args, family_cls):
    """ConfigError (one line, before any weights load) when the shards were written for another teacher family,
    resolution, VAE or text encoder than this run's; returns notes on the data flags the shards already applied."""
    where = "--train_shards_path_or_url"
    if record["family"] != family_cls.name:
        raise ConfigError(f"{where}: the precomputed shards hold {record['family']} text embeddings, but the teacher "
                          f"'{args.pretrained_teacher_model}' is {family_cls.name}; precompute them with this teacher")
    if record["resolution"] != args.resolution:
        raise ConfigError(f"{where}: the precomputed shards hold latents of {record['resolution']} px images, this "
                          f"run has --resolution {args.resolution}; pass --resolution {record['resolution']} or "
                          f"precompute at {args.resolution}")
    ours = encoder_fingerprints(args, family_cls)
    if ours["vae_config"] != record["vae_config"] or ours["scaling_factor"] != record["scaling_factor"]:
        vae_path, vae_sub = vae_source(args)
        raise ConfigError(f"{where}: the precomputed latents come from the VAE '{record['vae']}', whose config "
                          f"differs from this run's ('{vae_path}{'/' + vae_sub if vae_sub else ''}'); pass the same "
                          f"VAE (--pretrained_vae_model_name_or_path) or precompute with this one")
    if ours["text_encoder_configs"] != record["text_encoder_configs"]:
        raise ConfigError(f"{where}: the precomputed text embeddings come from the text encoder(s) of "
                          f"'{record['teacher']}', whose configs differ from those of '{args.pretrained_teacher_model}'; "
                          f"precompute with this teacher")
    notes = []
    for flag in ("center_crop", "random_flip", "interpolation_type"):
        if getattr(args, flag) != record[flag]:
            notes.append(f"--{flag} {getattr(args, flag)} has no effect: the precomputed shards were cropped with "
                         f"{flag} {record[flag]}")
    return notes


def sample_latents(batch, scaling_factor, chunk_size, generator, device):
    """z0 [B, C, h, w] = scaling_factor * (mean + std * eps) from a precomputed batch: the draw that encoding on the
    fly makes (DiagonalGaussianDistribution.sample, chunk by chunk from the same generator)."""
    from .teacher import to_device

    mean, std = to_device(batch["latent_mean"], device), to_device(batch["latent_std"], device)
    noise = torch.cat([torch.randn(chunk.shape, generator=generator, device=generator.device, dtype=torch.float32)
                       for chunk in mean.split(chunk_size)]).to(device)
    return (mean + std * noise) * scaling_factor


def shard_pattern(names):
    """A brace pattern for a list of shard paths that differ in one number of the same width ("a-{000..009}.tar")."""
    import re

    if len(names) == 1:
        return names[0]
    parts = [re.fullmatch(r"(.*?)(\d+)(\.tar)", name) for name in names]
    if not all(parts) or len({(p.group(1), p.group(3), len(p.group(2))) for p in parts}) != 1:
        return "::".join(names)
    numbers = sorted(int(p.group(2)) for p in parts)
    width = len(parts[0].group(2))
    if numbers != list(range(numbers[0], numbers[-1] + 1)):
        return "::".join(names)
    return f"{parts[0].group(1)}{{{numbers[0]:0{width}d}..{numbers[-1]:0{width}d}}}{parts[0].group(3)}"

