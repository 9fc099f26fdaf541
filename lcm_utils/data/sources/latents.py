"""Precomputed training samples: webdataset shards of VAE posteriors and text embeddings (lcm_utils.precompute
writes them; this is their format and their reader).

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

import io
import json
import tarfile

import torch

from ...errors import ConfigError
from ...tensors import to_device, to_latent_space
from ..samples import SkipSample, checked_caption, json_record, text_caption
from ..shards import HEADER_KEY, read_shard
from .webdataset import ShardSource

FORMAT = "lcm-precomputed/1"
# Source metadata kept in a precomputed sample's json, so the training filters still apply to it.
KEPT_METADATA = ("pwatermark", "aesthetic")


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

    def __init__(self, spec, header, rank: int = 0):
        super().__init__(spec, rank)
        self.header, self.unconditional_text = header

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
        rules = self.rules
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


def latents_from_posterior(batch, scaling_factor, chunk_size, generator, device, shift_factor=None):
    """z0 [B, C, h, w] = (mean + std * eps - shift) * scale from a precomputed batch: the draw that encoding on the
    fly makes (DiagonalGaussianDistribution.sample, chunk by chunk from the same generator)."""
    mean, std = to_device(batch["latent_mean"], device), to_device(batch["latent_std"], device)
    noise = torch.cat([torch.randn(chunk.shape, generator=generator, device=generator.device, dtype=torch.float32)
                       for chunk in mean.split(chunk_size)]).to(device)
    return to_latent_space(mean + std * noise, scaling_factor, shift_factor)


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
