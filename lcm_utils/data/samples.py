"""One sample: its caption rules, metadata sizes and filters, the guarded image decoder, the transform, the batch.

Every image source (folder, shards, datasets) and precompute decode through `decode_sample`; every random choice
of a sample comes from `sample_rng`, so a replay draws the same crop, flip and prompt drop.
"""

import io
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
# PIL only tries the decoders of the formats we accept, which keeps exotic parsers out of reach.
# (JPEG's opener also covers MPO, the multi-picture JPEG some cameras write.)
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
Image.init()  # Image.open(formats=...) looks decoders up without registering WEBP itself
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
SKIP_REASONS = (
    "bad_image",
    "missing_image",
    "missing_caption",
    "bad_caption",
    "truncated_shard",
    "bad_metadata",
    "bad_size_metadata",
    "bad_latents",  # a precomputed sample without readable latents
    # LAION-style filters: the reason names the flag that rejected the sample.
    "filtered_min_original_size",
    "filtered_max_watermark_probability",
    "filtered_min_aesthetic_score",
)
FILTER_PREFIX = "filtered_"
# Where a sample's original size (for SDXL's time ids and --min_original_size) is read, first match wins:
# LAION's original_* fields hold the size before img2dataset resized it, width/height the stored size.
SIZE_FIELDS = (("original_height", "original_width"), ("height", "width"))
MAX_ORIGINAL_SIZE = 2**20  # px; a larger "size" is a broken record (and would not fit a batch's int64 tensor)
WATERMARK_FIELD, AESTHETIC_FIELD = "pwatermark", "aesthetic"
# Counted next to the skip reasons, but the sample is kept.
REENCODED = "caption_reencoded"


class SkipSample(Exception):
    """A raw sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def text_caption(data: bytes) -> tuple:
    """(caption, reencoded): UTF-8 (BOM allowed), falling back to latin-1, which never fails."""
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return data.decode("latin-1"), True


def json_caption(data: bytes):
    """The "caption" field of a JSON object, else its "text" field; None when neither is there."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise SkipSample("bad_caption") from None
    if not isinstance(record, dict):
        raise SkipSample("bad_caption")
    return record.get("caption", record.get("text"))


def json_record(data: bytes) -> dict:
    """The sample's json as a dict; {} when it is not a JSON object (the caption may come from .txt)."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def checked_caption(caption):
    """The caption stripped of surrounding whitespace; skip when absent, empty or not text. A list of captions
    (several per image, as datasets such as COCO have) keeps its usable ones; the transform draws one."""
    if isinstance(caption, (list, tuple)):
        usable = [c.strip() for c in caption if isinstance(c, str) and c.strip()]
        if not usable:
            raise SkipSample("missing_caption" if all(isinstance(c, str) for c in caption) else "bad_caption")
        return usable[0] if len(usable) == 1 else usable
    if caption is None:
        raise SkipSample("missing_caption")
    if not isinstance(caption, str):
        raise SkipSample("bad_caption")
    caption = caption.strip()
    if not caption:
        raise SkipSample("missing_caption")
    return caption


def _number(value) -> Optional[float]:
    """A finite float from a JSON number or numeric string; None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metadata_size(meta: dict) -> Optional[tuple]:
    """Original (height, width) from a sample's metadata (SIZE_FIELDS), None when it has none; a size that is not
    two positive numbers skips the sample (bad_size_metadata)."""
    for height_key, width_key in SIZE_FIELDS:
        raw = (meta.get(height_key), meta.get(width_key))
        if raw == (None, None):
            continue
        height, width = (_number(value) for value in raw)
        if height is None or width is None or not (1 <= round(height) <= MAX_ORIGINAL_SIZE
                                                   and 1 <= round(width) <= MAX_ORIGINAL_SIZE):
            raise SkipSample("bad_size_metadata")
        return int(round(height)), int(round(width))
    return None


@dataclass
class SampleRules:
    """LAION-style filters; a sample without the field a filter reads passes it (the size always exists: the
    metadata's, else the image's own)."""

    min_original_size: Optional[int] = None
    max_watermark_probability: Optional[float] = None
    min_aesthetic_score: Optional[float] = None
    read_sizes: bool = True  # else the original size is the image's own and size metadata is not looked at

    @classmethod
    def from_spec(cls, spec) -> "SampleRules":
        read_sizes = spec.use_size_metadata or spec.min_original_size is not None
        return cls(spec.min_original_size, spec.max_watermark_probability, spec.min_aesthetic_score, read_sizes)

    def check_size(self, size: tuple) -> None:
        if self.min_original_size is not None and min(size) < self.min_original_size:
            raise SkipSample("filtered_min_original_size")

    def check_scores(self, meta: dict) -> None:
        for limit, field, passes, reason in (
                (self.max_watermark_probability, WATERMARK_FIELD, lambda v, m: v <= m, "max_watermark_probability"),
                (self.min_aesthetic_score, AESTHETIC_FIELD, lambda v, m: v >= m, "min_aesthetic_score")):
            if limit is None or meta.get(field) is None:
                continue
            value = _number(meta[field])
            if value is None:
                raise SkipSample("bad_metadata")
            if not passes(value, limit):
                raise SkipSample(FILTER_PREFIX + reason)

    def image_and_size(self, meta: dict, load_image) -> tuple:
        """(RGB image, original (height, width)) of a sample that passes the filters; the image is decoded only
        after the metadata checks, so a rejected sample costs no image decode when its metadata has a size."""
        size = metadata_size(meta) if self.read_sizes else None
        self.check_scores(meta)
        if size is not None:
            self.check_size(size)
        image = load_image()
        if size is None:
            size = (image.height, image.width)
            self.check_size(size)
        return image, size


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit grey to 8-bit RGB by the value range of the type, so bright pixels are not clipped."""
    values = np.asarray(image).astype(np.float64)
    # I;16 is 16-bit by definition; I and F carry no depth, so take 16-bit when values exceed 8-bit.
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_rgb(image)
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: Optional[bytes]) -> Image.Image:
    """Fully decoded RGB image, or SkipSample("bad_image") for empty, corrupt, truncated or bomb bytes."""
    if not data:
        raise SkipSample("bad_image")
    try:
        # No `with`: closing would invalidate an RGB image that to_rgb returns as it is.
        image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        image.load()  # decoding happens here, so truncation is caught here
        return to_rgb(image)
    except Exception:
        # PIL raises OSError, ValueError, SyntaxError, struct.error, DecompressionBombError, ...
        # for bad bytes; any of them only means this one sample is unusable.
        raise SkipSample("bad_image") from None


def read_file(root: str, relative: str) -> bytes:
    """Bytes of an image file, or SkipSample when it is gone or unreadable."""
    try:
        with open(os.path.join(root, relative), "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise SkipSample("missing_image") from None
    except OSError:
        raise SkipSample("bad_image") from None


def decode_sample(caption, reencoded, meta, load_image, rules):
    """(RGB image, caption, reencoded, original (h, w)) of a raw sample that passes the rules, or SkipSample: the
    caption checked first, then the filters on the metadata, then the image (`load_image`) decoded."""
    caption = checked_caption(caption)
    image, size = rules.image_and_size(meta, load_image)
    return image, caption, reencoded, size


@dataclass
class Transform:
    """Resize the shorter side to `resolution`, crop a square, maybe flip, maybe empty the caption."""

    resolution: int
    resample: int
    center_crop: bool
    random_flip: bool
    proportion_empty_prompts: float

    @classmethod
    def from_spec(cls, spec) -> "Transform":
        """Transform configured by the data flags."""
        resample = INTERPOLATIONS[spec.interpolation_type.lower()]
        return cls(spec.resolution, resample, spec.center_crop, spec.random_flip, spec.proportion_empty_prompts)

    def resized_size(self, width: int, height: int) -> tuple:
        """(width, height) after scaling the shorter side to the resolution."""
        scale = self.resolution / min(width, height)
        return max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale))

    def __call__(self, image: Image.Image, caption, rng: np.random.Generator, original_size=None) -> dict:
        """One training example: pixels in [-1, 1] CHW, caption, original (h, w), crop (top, left).

        original_size: (h, w) from the sample's metadata, else the image's own. The crop is where the kept
        square starts in the resized image; for a flipped sample, where it starts in the flipped image."""
        size = self.resolution
        width, height = image.size
        resized_width, resized_height = self.resized_size(width, height)
        # Always draw the same numbers so the flags do not shift each other's randomness.
        crop_top_draw, crop_left_draw, flip_draw, empty_draw, caption_draw = rng.random(5)
        if isinstance(caption, list):  # several captions per image: one per visit
            caption = caption[int(caption_draw * len(caption))]
        if self.center_crop:
            top, left = (resized_height - size) // 2, (resized_width - size) // 2
        else:
            top = int(crop_top_draw * (resized_height - size + 1))
            left = int(crop_left_draw * (resized_width - size + 1))
        # Resizing only the crop box (in source coordinates) equals resize-then-crop without
        # allocating the whole resized image, which matters for extreme aspect ratios.
        x_scale, y_scale = width / resized_width, height / resized_height
        box = (left * x_scale, top * y_scale, (left + size) * x_scale, (top + size) * y_scale)
        crop = image.resize((size, size), self.resample, box=box)
        if self.random_flip and flip_draw < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            # Cropping the flipped image at this left edge gives the same pixels (SDXL conditions on it).
            left = resized_width - size - left
        if empty_draw < self.proportion_empty_prompts:
            caption = ""
        pixels = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
            "caption": caption,
            "original_size": tuple(original_size) if original_size is not None else (height, width),
            "crop_top_left": (top, left),
        }


def collate(examples: list) -> dict:
    """Batch dict of stacked examples: pixel_values (images) or latent_mean/latent_std and a text dict
    (precomputed shards), captions, original sizes and crops."""
    batch = {
        "captions": [example["caption"] for example in examples],
        "original_sizes": torch.tensor([example["original_size"] for example in examples], dtype=torch.int64),
        "crop_top_lefts": torch.tensor([example["crop_top_left"] for example in examples], dtype=torch.int64),
    }
    for key in ("pixel_values", "latent_mean", "latent_std"):
        if key in examples[0]:
            batch[key] = torch.stack([example[key] for example in examples])
    if "text" in examples[0]:
        batch["text"] = {key: torch.stack([example["text"][key] for example in examples])
                         for key in examples[0]["text"]}
    return batch


def image_example(decoded: tuple, transform: Transform, rng: np.random.Generator) -> dict:
    """The training example of a decoded (image, caption, original size): every image source's `example`."""
    image, caption, size = decoded
    return transform(image, caption, rng, size)


def sample_rng(seed: int, epoch: int, slot: int, index: int) -> np.random.Generator:
    """Per-sample generator: a replay of the same sample draws the same crop, flip and prompt drop."""
    return np.random.default_rng([seed, epoch, slot, index])
