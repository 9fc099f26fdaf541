"""Deterministic, resumable (image, caption) training stream from webdataset shards, an image folder or a
Hugging Face dataset.

Every random choice (epoch order, shuffle buffer, crop, flip, empty prompt) is drawn from numpy
generators seeded by (seed, epoch, reader slot, sample index), so a stream restored from
`TrainStream.state_dict()` yields bitwise the same batches as one that never stopped. A shard reader's
state names the samples in its shuffle buffer, so a resume reopens only the shards that still hold them.
"""

import io
import json
import math
import os
import posixpath
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, fields
from itertools import chain, islice
from typing import Iterator, Optional
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen
from webdataset.shardlists import expand_urls

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
# Only these tar members are ever read into memory; anything else (.pth, .pyd, .pickle, ...) is
# dropped unread so no untrusted object is ever unpickled.
# "safetensors": the latents and text embeddings of shards written by lcm_utils.precompute.
DECODED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS + ("safetensors",))
# Key of the first sample of a precomputed shard: what wrote it, not a training sample (see lcm_utils.latents).
HEADER_KEY = "__precomputed__"
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
METADATA_FILE = "metadata.jsonl"
PREFETCH_FACTOR = 2


@dataclass
class DataSpec:
    """Where the training pairs come from and how they are shaped; names follow the diffusers flags."""

    train_shards_path_or_url: Optional[str] = None
    train_data_dir: Optional[str] = None
    resolution: int = 512
    interpolation_type: str = "bilinear"
    center_crop: bool = False
    random_flip: bool = False
    proportion_empty_prompts: float = 0.0
    max_train_samples: Optional[int] = None
    train_batch_size: int = 16
    dataloader_num_workers: int = 0
    shuffle_buffer_size: int = 1000
    image_column: Optional[str] = None  # folder: metadata.jsonl key (file_name); dataset: column (image)
    caption_column: str = "text"
    seed: int = 0
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    cache_dir: Optional[str] = None
    min_original_size: Optional[int] = None
    max_watermark_probability: Optional[float] = None
    min_aesthetic_score: Optional[float] = None
    use_size_metadata: bool = True  # read original sizes from metadata (SDXL's time ids); SD does not need them

    @classmethod
    def from_flags(cls, args, seed: int, use_size_metadata: bool = True) -> "DataSpec":
        """The spec of parsed flags (the fields are named as the flags); flags a command does not take
        (lcm_utils.precompute has no shuffling or prompt dropping) keep the defaults."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**dict(values, seed=seed, use_size_metadata=use_size_metadata))


class DataError(ValueError):
    """A data problem the user can fix; the message names the flag or file and the fix."""


class ReaderError(DataError):
    """A DataError one rank's reader found (its share is empty or all bad): only that rank knows it."""


# ----------------------------------------------------------------------------- validation


def readers_per_rank(spec: DataSpec) -> int:
    """Logical readers per process: the main process counts as one when there are no workers."""
    return max(1, spec.dataloader_num_workers)


def expand_shard_urls(pattern: str) -> list:
    """Shard urls of a '::'-joined list of brace patterns (webdataset's convention)."""
    return [url for url in expand_urls(pattern) if url.strip()]


def _is_local(url: str) -> bool:
    """True for plain paths and file: urls, which can be checked and opened without gopen."""
    scheme = urlparse(url).scheme
    return scheme in ("", "file") and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    """Filesystem path of a plain path or file: url."""
    return urlparse(url).path if url.startswith("file:") else url


def _is_image_file(name: str) -> bool:
    """Image file by extension, case-insensitive."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _has_image(root: str) -> bool:
    """Whether the folder holds at least one image anywhere below it; stops at the first."""
    for _, _, names in os.walk(root):
        if any(_is_image_file(name) for name in names):
            return True
    return False


def _check_numbers(spec: DataSpec) -> None:
    """Range checks of the numeric flags and the interpolation name."""
    if spec.resolution <= 0:
        raise DataError(f"--resolution must be > 0, got {spec.resolution}")
    if spec.train_batch_size <= 0:
        raise DataError(f"--train_batch_size must be > 0, got {spec.train_batch_size}")
    if spec.dataloader_num_workers < 0:
        raise DataError(f"--dataloader_num_workers must be >= 0, got {spec.dataloader_num_workers}")
    if not 0.0 <= spec.proportion_empty_prompts <= 1.0:
        raise DataError(f"--proportion_empty_prompts must be in [0, 1], got {spec.proportion_empty_prompts}")
    if spec.max_train_samples is not None and spec.max_train_samples <= 0:
        raise DataError(f"--max_train_samples must be > 0 or unset, got {spec.max_train_samples}")
    if spec.shuffle_buffer_size < 0:
        raise DataError(f"--shuffle_buffer_size must be >= 0, got {spec.shuffle_buffer_size}")
    if spec.min_original_size is not None and spec.min_original_size <= 0:
        raise DataError(f"--min_original_size must be > 0 or unset, got {spec.min_original_size}")
    if spec.max_watermark_probability is not None and not 0.0 <= spec.max_watermark_probability <= 1.0:
        raise DataError(f"--max_watermark_probability must be in [0, 1] or unset, got {spec.max_watermark_probability}")
    if spec.interpolation_type.lower() not in INTERPOLATIONS:
        names = "|".join(INTERPOLATIONS)
        raise DataError(f"--interpolation_type: unknown filter '{spec.interpolation_type}'; use one of {names}")


def _check_shards(pattern: str) -> None:
    """Every local shard named by the pattern exists; pipe: and remote urls are not checked."""
    urls = expand_shard_urls(pattern)
    if not urls:
        raise DataError(f"--train_shards_path_or_url: '{pattern}' expands to no shards")
    missing = [url for url in urls if _is_local(url) and not os.path.isfile(_local_path(url))]
    if missing:
        raise DataError(
            f"--train_shards_path_or_url: shard file '{missing[0]}' does not exist "
            f"({len(missing)} of {len(urls)} expanded shards missing); check the path and the brace range"
        )


def _check_folder(root: str) -> None:
    """The folder exists and holds at least one image."""
    if not os.path.isdir(root):
        raise DataError(f"--train_data_dir: folder '{root}' does not exist; point it at a folder of images")
    if not _has_image(root):
        extensions = "/".join(f".{ext}" for ext in IMAGE_EXTENSIONS)
        raise DataError(
            f"--train_data_dir: folder '{root}' holds no images ({extensions}); point it at a folder of "
            f"images with captions in {METADATA_FILE} or in a .txt file next to each image"
        )


def _check_dataset(spec: DataSpec) -> None:
    """The datasets package is installed, and a local-looking dataset path exists (a Hub name is not checked)."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise DataError("--dataset_name needs the 'datasets' package: pip install datasets")
    name = spec.dataset_name
    if name.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise DataError(f"--dataset_name: '{name}' does not exist; pass a dataset folder or a Hub dataset name")


def check_data_spec(spec: DataSpec) -> None:
    """Cheap validation before any heavy loading; raises DataError naming the flag and the fix."""
    given = [flag for flag, value in (("--train_shards_path_or_url", spec.train_shards_path_or_url),
                                      ("--train_data_dir", spec.train_data_dir),
                                      ("--dataset_name", spec.dataset_name)) if value]
    if len(given) > 1:
        raise DataError(f"{' and '.join(given)} are {'both' if len(given) == 2 else 'all'} set; pass only one "
                        f"data source")
    if not given:
        raise DataError("no training data: pass --train_shards_path_or_url (webdataset shards), --train_data_dir "
                        "(an image folder) or --dataset_name (a Hugging Face dataset)")
    _check_numbers(spec)
    if spec.train_shards_path_or_url:
        _check_shards(spec.train_shards_path_or_url)
    elif spec.train_data_dir:
        _check_folder(spec.train_data_dir)
    else:
        _check_dataset(spec)


# ----------------------------------------------------------------------------- decoding


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
    def from_spec(cls, spec: DataSpec) -> "SampleRules":
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


# ----------------------------------------------------------------------------- transform


@dataclass
class Transform:
    """Resize the shorter side to `resolution`, crop a square, maybe flip, maybe empty the caption."""

    resolution: int
    resample: int
    center_crop: bool
    random_flip: bool
    proportion_empty_prompts: float

    @classmethod
    def from_spec(cls, spec: DataSpec) -> "Transform":
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


# ----------------------------------------------------------------------------- image folder


def list_images(root: str) -> list:
    """Relative posix paths of all images below root, sorted."""
    found = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories.sort()
        relative_dir = os.path.relpath(directory, root)
        for name in names:
            if _is_image_file(name):
                path = name if relative_dir == "." else os.path.join(relative_dir, name)
                found.append(path.replace(os.sep, "/"))
    return sorted(found)


def _normalised_relative(path: str) -> str:
    """metadata.jsonl path in the form list_images returns (posix, no './')."""
    return posixpath.normpath(path.replace("\\", "/"))


def read_metadata(path: str, image_column: str) -> tuple:
    """({relative image path: record}, number of malformed lines) from a metadata.jsonl."""
    records, malformed = {}, 0
    with open(path, "rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict) or not isinstance(record.get(image_column), str):
                malformed += 1
                continue
            records[_normalised_relative(record[image_column])] = record
    return records, malformed


def pack_bitmap(flags: np.ndarray) -> str:
    """A boolean array as compact JSON-able text (zlib-compressed bits, base64)."""
    import base64

    return base64.b64encode(zlib.compress(np.packbits(flags).tobytes())).decode("ascii")


def unpack_bitmap(text: str, length: int) -> np.ndarray:
    import base64

    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits)[:length].astype(bool)


def epoch_order(num_items: int, seed: int, epoch: int, plan: Optional[dict] = None) -> np.ndarray:
    """Item numbers of an indexable source's epoch in reading order: the seeded permutation, less the items an
    elastic resume found already used (`plan`)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    if plan is not None:
        order = order[~unpack_bitmap(plan["consumed"], num_items)[order]]
    return order


def permuted_share(num_items: int, seed: int, epoch: int, slot: int, num_readers: int, start: int,
                   plan: Optional[dict] = None):
    """(index, item number, None) of a reader's share of the epoch's order of an indexable source, from `start`;
    no state function: `start` alone places a reader in its share."""
    share = epoch_order(num_items, seed, epoch, plan)[slot::num_readers]
    for index in range(start, len(share)):
        yield index, int(share[index]), None


def indexable_elastic_plan(num_items: int, seed: int, epoch: int, readers: list, num_readers: int,
                           plan: Optional[dict]) -> dict:
    """The plan of `epoch` for a new reader layout: every item an old reader already used is marked consumed.
    readers: the old layout's [{"slot", "epoch", "emitted"}], num_readers of them."""
    order = epoch_order(num_items, seed, epoch, plan)
    consumed = unpack_bitmap(plan["consumed"], num_items) if plan else np.zeros(num_items, dtype=bool)
    for reader in readers:
        share = order[reader["slot"]::num_readers]
        if reader["epoch"] > epoch:
            consumed[share] = True
        elif reader["epoch"] == epoch:
            consumed[share[:reader["emitted"]]] = True
    return {"consumed": pack_bitmap(consumed)}


class FolderSource:
    """Images below a folder with captions from metadata.jsonl or sidecar .txt files."""

    flag = "--train_data_dir"
    example = staticmethod(image_example)

    def __init__(self, spec: DataSpec, count_listing: bool):
        self.root = spec.train_data_dir
        self.items = list_images(self.root)
        if spec.max_train_samples is not None:
            self.items = self.items[: spec.max_train_samples]
        self.records = None
        self.caption_column = spec.caption_column
        self.rules = SampleRules.from_spec(spec)
        # Listing problems are global, so only one process reports them.
        self.listing_counts = Counter()
        metadata_path = os.path.join(self.root, METADATA_FILE)
        # 'image' is the column that load_dataset("imagefolder") makes of the file_name key: the same thing here.
        image_key = "file_name" if spec.image_column in (None, "image") else spec.image_column
        if os.path.isfile(metadata_path):
            self.records, malformed = read_metadata(metadata_path, image_key)
            if count_listing and malformed:
                self.listing_counts["bad_metadata"] = malformed

    @property
    def description(self) -> str:
        """Where the samples come from, for messages."""
        return f"{self.flag} '{self.root}'"

    @property
    def samples_per_epoch(self) -> int:
        """Global samples per epoch."""
        return len(self.items)

    def iter_epoch(self, seed: int, epoch: int, slot: int, num_readers: int, start: int, events: list,
                   shard_state: Optional[dict] = None, plan: Optional[dict] = None):
        """(index, item number, None) of this reader's share of the epoch permutation, from `start`."""
        return permuted_share(len(self.items), seed, epoch, slot, num_readers, start, plan)

    def elastic_plan(self, seed, epoch, readers, num_readers, plan, new_readers):
        return indexable_elastic_plan(len(self.items), seed, epoch, readers, num_readers, plan)

    def _caption_bytes_or_value(self, relative: str):
        """Raw caption: a metadata value, sidecar .txt bytes, or None."""
        if self.records is not None:
            return self.records.get(relative, {}).get(self.caption_column)
        sidecar = os.path.join(self.root, os.path.splitext(relative)[0] + ".txt")
        if not os.path.isfile(sidecar):
            return None
        with open(sidecar, "rb") as file:
            return file.read()

    def decode(self, item: int) -> tuple:
        """(RGB image, caption, reencoded, original (h, w)) of one item, or SkipSample."""
        relative = self.items[item]
        raw_caption = self._caption_bytes_or_value(relative)
        reencoded = False
        if isinstance(raw_caption, bytes):
            raw_caption, reencoded = text_caption(raw_caption)
        caption = checked_caption(raw_caption)
        meta = self.records.get(relative, {}) if self.records is not None else {}
        image, size = self.rules.image_and_size(meta, lambda: decode_image(read_file(self.root, relative)))
        return image, caption, reencoded, size


def read_file(root: str, relative: str) -> bytes:
    """Bytes of an image file, or SkipSample when it is gone or unreadable."""
    try:
        with open(os.path.join(root, relative), "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise SkipSample("missing_image") from None
    except OSError:
        raise SkipSample("bad_image") from None


# ----------------------------------------------------------------------------- webdataset shards

# Stands in the raw sample stream where a shard could not be read to its end.
SHARD_DAMAGED = "truncated_shard"


def member_key_and_extension(name: str) -> tuple:
    """(key, lowercased extension) of a tar member: key is the path up to the basename's first '.'."""
    directory, basename = posixpath.split(name)
    if "." not in basename:
        return None, None
    stem, extension = basename.split(".", 1)
    return posixpath.join(directory, stem), extension.lower()


def _open_shard(url: str):
    """Binary stream of a shard: local files directly, everything else (pipe:, http:, ...) via gopen."""
    if _is_local(url):
        return open(_local_path(url), "rb")
    return gopen(url, "rb")


def _close_quietly(stream) -> None:
    """Close a shard stream; a pipe we stopped reading early exits non-zero, which is expected."""
    try:
        stream.close()
    except Exception:
        pass


def read_shard(url: str, header: bool = False) -> Iterator:
    """Raw samples {"__key__", ext: bytes} of one tar, then SHARD_DAMAGED if it breaks off early. A precomputed
    shard's header sample is left out, or with `header` is the only sample read."""
    try:
        stream = _open_shard(url)
    except Exception:
        yield SHARD_DAMAGED
        return
    key, sample = None, None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = member_key_and_extension(member.name)
                if header and member_key != HEADER_KEY:
                    break
                if member_key is None or (member_key == HEADER_KEY and not header):
                    continue
                if member_key != key:
                    if sample is not None:
                        yield sample
                    key, sample = member_key, {"__key__": member_key}
                if extension in DECODED_EXTENSIONS:
                    sample[extension] = tar.extractfile(member).read()
        if sample is not None:
            yield sample
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        # The sample being read when the damage hit may be incomplete, so it is dropped with it.
        yield SHARD_DAMAGED
    finally:
        _close_quietly(stream)


class ShuffleBuffer:
    """Approximate shuffle through `size` buffered samples, drawn from `rng` only; its state can be saved."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.items = []  # (id, raw sample) pairs in buffer order
        self.exhausted = False  # the input has ended: only draining the buffer is left

    def shuffle(self, items: Iterator) -> Iterator:
        """The (id, raw sample) pairs of `items` in shuffled order; the state is consistent at every yield."""
        if self.size <= 1:
            yield from items
            return
        if not self.exhausted:
            for item in items:
                if len(self.items) < self.size:
                    self.items.append(item)
                    continue
                pick = int(self.rng.integers(len(self.items)))
                # Replaced before the yield, so a state taken at the yield already holds the new sample.
                drawn, self.items[pick] = self.items[pick], item
                yield drawn
            self.exhausted = True
        while self.items:
            pick = int(self.rng.integers(len(self.items)))
            self.items[pick], self.items[-1] = self.items[-1], self.items[pick]
            yield self.items.pop()


def _read_until(raw: Iterator, wanted: set, last: tuple) -> tuple:
    """({id: sample} of the wanted ids among the raw samples up to id `last`, the raw samples after it)."""
    found = {}
    for sample_id, sample in raw:
        if sample_id > last:  # a shard reads shorter than before the checkpoint: keep what follows
            return found, chain([(sample_id, sample)], raw)
        if sample_id in wanted:
            found[sample_id] = sample
        if sample_id == last:
            break
    return found, raw


class ShardEpoch:
    """One reader's raw samples of an epoch, with ids (shard position, sample in shard), through its buffer."""

    def __init__(self, urls: list, by_sample: bool, slot: int, num_readers: int, shuffler: ShuffleBuffer,
                 events: list, picks: Optional[list] = None):
        self.urls = urls  # this reader's shards in epoch order; every shard when split by sample
        # Per shard, which samples an elastic resume left to read: (first index, only these indices or None).
        self.picks = picks or [(0, None)] * len(urls)
        self.by_sample = by_sample
        self.slot, self.num_readers = slot, num_readers
        self.shuffler = shuffler
        self.events = events
        self.next = [0, 0]  # id of the next raw sample to read
        # Global sample index at the start of each opened shard: the split by sample needs it to reopen one.
        self.shard_starts = {}

    def raw(self, first: int, global_index: int) -> Iterator:
        """(id, raw sample) of this reader from shard position `first`, whose first sample is `global_index`."""
        for position in range(first, len(self.urls)):
            self.shard_starts[position] = global_index
            index = 0
            lowest, only = self.picks[position]
            for sample in read_shard(self.urls[position]):
                # Split by sample, a damage is counted by the one reader whose turn it interrupts.
                mine = not self.by_sample or global_index % self.num_readers == self.slot
                if index < lowest or (only is not None and index not in only):
                    mine = False  # used before an elastic resume
                if sample is SHARD_DAMAGED:
                    if mine:
                        self.events.append(SHARD_DAMAGED)
                    continue
                if mine:
                    self.next = [position, index + 1]
                    yield (position, index), sample
                index, global_index = index + 1, global_index + 1

    def state(self) -> dict:
        """JSON-able rebuild point after the last yielded sample: first shard to reopen, input, buffer, RNG."""
        buffered = [list(sample_id) for sample_id, _ in self.shuffler.items]
        # Unless the input has ended, the last sample read is read again to stand where the input stopped.
        positions = [position for position, _ in buffered] + ([] if self.shuffler.exhausted else [self.next[0]])
        first = min(positions, default=None)
        return {
            "start": None if first is None else [first, self.shard_starts[first]],
            "next": list(self.next),
            "buffer": buffered,
            "exhausted": self.shuffler.exhausted,
            "rng": self.shuffler.rng.bit_generator.state,
        }

    def restore(self, saved: dict) -> Iterator:
        """Refill the buffer from the shards still holding its samples; returns the raw samples after the input."""
        wanted = [tuple(sample_id) for sample_id in saved["buffer"]]
        found, rest = {}, iter(())
        if saved["start"] is not None:
            last = max(wanted) if saved["exhausted"] else (saved["next"][0], saved["next"][1] - 1)
            found, rest = _read_until(self.raw(*saved["start"]), set(wanted), last)
        # Damage met while rebuilding was counted before the checkpoint.
        self.events.clear()
        self.shuffler.items = [(sample_id, found[sample_id]) for sample_id in wanted if sample_id in found]
        self.shuffler.rng.bit_generator.state = saved["rng"]
        self.shuffler.exhausted = saved["exhausted"]
        self.next = list(saved["next"])
        return iter(()) if saved["exhausted"] else rest


def json_record(data: bytes) -> dict:
    """The sample's json as a dict; {} when it is not a JSON object (the caption may come from .txt)."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def decode_shard_sample(sample: dict, rules: Optional[SampleRules] = None) -> tuple:
    """(RGB image, caption, reencoded, original (h, w)) of one raw tar sample, or SkipSample."""
    image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_bytes is None:
        raise SkipSample("missing_image")
    reencoded = False
    if "txt" in sample:
        raw_caption, reencoded = text_caption(sample["txt"])
    elif "json" in sample:
        raw_caption = json_caption(sample["json"])
    else:
        raw_caption = None
    caption = checked_caption(raw_caption)
    meta = json_record(sample["json"]) if "json" in sample else {}
    image, size = (rules or SampleRules()).image_and_size(meta, lambda: decode_image(image_bytes))
    return image, caption, reencoded, size


def deal_segments(segments: list, readers: int, shard_length: int, total: Optional[int]) -> dict:
    """An elastic plan for shards: segments dealt to readers longest first, each to the reader with the least
    estimated work (a shard's length estimated as the longest seen in the checkpoint, since a tar does not say);
    with an epoch length, `total` samples split between the readers in proportion to their estimated work."""
    def length(segment):
        _, first, only = segment
        return len(only) if only is not None else max(shard_length - first, 1)

    dealt, load = [[] for _ in range(readers)], [0] * readers
    for segment in sorted(segments, key=length, reverse=True):
        reader = load.index(min(load))
        dealt[reader].append(segment)
        load[reader] += length(segment)
    limits = None
    if total is not None:
        weight = sum(load) or 1
        limits = [total * work // weight for work in load]
        by_remainder = sorted(range(readers), key=lambda r: (-(total * load[r] % weight), r))
        for reader in by_remainder[: total - sum(limits)]:
            limits[reader] += 1
    return {"readers": dealt, "limits": limits}


class ShardSource:
    """Samples of webdataset tar shards, split between readers by shard or by sample index."""

    flag = "--train_shards_path_or_url"

    def __init__(self, spec: DataSpec):
        self.pattern = spec.train_shards_path_or_url
        self.urls = expand_shard_urls(self.pattern)
        self.buffer_size = spec.shuffle_buffer_size
        self.max_train_samples = spec.max_train_samples
        self.rules = SampleRules.from_spec(spec)
        self.listing_counts = Counter()

    @property
    def description(self) -> str:
        """Where the samples come from, for messages."""
        return f"{self.flag} '{self.pattern}'"

    @property
    def samples_per_epoch(self) -> Optional[int]:
        """Global samples per epoch: only known when max_train_samples sets it."""
        return self.max_train_samples

    def reader_segments(self, seed: int, epoch: int, slot: int, num_readers: int, plan: Optional[dict]) -> tuple:
        """(segments [[url number, first index, only-indices or None]], split by sample) of a reader's epoch."""
        if plan is not None:  # an elastic resume's rest of the epoch, dealt out segment by segment
            return [list(segment) for segment in plan["readers"][slot]], False
        order = [int(i) for i in np.random.default_rng([seed, epoch]).permutation(len(self.urls))]
        # Too few shards to split: every reader reads all of them and keeps every num_readers-th sample.
        by_sample = len(order) < num_readers
        return [[i, 0, None] for i in (order if by_sample else order[slot::num_readers])], by_sample

    def _epoch_reader(self, seed: int, epoch: int, slot: int, num_readers: int, events: list,
                      plan: Optional[dict] = None) -> ShardEpoch:
        """The reader's shards of the epoch and its seeded shuffle buffer."""
        segments, by_sample = self.reader_segments(seed, epoch, slot, num_readers, plan)
        shuffler = ShuffleBuffer(self.buffer_size, np.random.default_rng([seed, epoch, slot]))
        picks = [(first, None if only is None else frozenset(only)) for _, first, only in segments]
        return ShardEpoch([self.urls[i] for i, _, _ in segments], by_sample, slot, num_readers, shuffler, events,
                          picks)

    def _reader_limit(self, slot: int, num_readers: int, plan: Optional[dict]) -> Optional[int]:
        """Samples a reader takes of an epoch: max_train_samples split (rounded up) between the readers; in an
        epoch split by an elastic resume, what was left of it, split exactly."""
        if plan is None:
            return None if self.max_train_samples is None else math.ceil(self.max_train_samples / num_readers)
        return None if plan.get("limits") is None else plan["limits"][slot]

    def elastic_plan(self, seed: int, epoch: int, readers: list, num_readers: int, plan: Optional[dict],
                     new_readers: int) -> dict:
        """The rest of `epoch` after the old layout's `num_readers` readers: what each has not read yet, the samples
        waiting in its shuffle buffer included, as segments dealt to `new_readers` readers, balanced by estimated
        length; with an epoch length, the samples left of it split in proportion."""
        segments, left, longest = [], 0, 1
        for reader in readers:
            limit = self._reader_limit(reader["slot"], num_readers, plan)
            mine, by_sample = self.reader_segments(seed, epoch, reader["slot"], num_readers, plan)
            state = reader.get("shard_state")
            if reader["epoch"] > epoch or (limit is not None and reader["epoch"] == epoch
                                           and reader["emitted"] >= limit):
                continue
            if reader["epoch"] < epoch or (reader["emitted"] == 0 and state is None):
                left += limit or 0
                if by_sample:
                    raise DataError("an elastic resume needs at least as many shards as data readers (processes x "
                                    "workers) in the checkpoint's run; resume with its processes and workers")
                segments += mine
                continue
            if state is None or by_sample:
                raise DataError("this checkpoint's shard position cannot be split between another number of readers "
                                "(it predates shard states, or read fewer shards than readers); resume with the "
                                "processes and --dataloader_num_workers that wrote it")
            left += (limit or 0) - reader["emitted"]
            waiting = {}
            for position, index in state["buffer"]:
                waiting.setdefault(position, []).append(index)
                longest = max(longest, index + 1)
            longest = max(longest, state["next"][1])
            for position, indices in sorted(waiting.items()):
                segments.append([mine[position][0], 0, sorted(indices)])
            if not state["exhausted"]:
                position, index = state["next"]
                if position < len(mine):
                    url, first, only = mine[position]
                    later = None if only is None else [i for i in only if i >= index]
                    if later is None or later:
                        segments.append([url, max(first, index), later])
                segments += mine[position + 1:]
        has_limit = self.max_train_samples is not None if plan is None else plan.get("limits") is not None
        return deal_segments(segments, new_readers, longest, left if has_limit else None)

    def iter_epoch(self, seed: int, epoch: int, slot: int, num_readers: int, start: int, events: list,
                   shard_state: Optional[dict] = None, plan: Optional[dict] = None):
        """(index, raw sample, state function) after the shuffle buffer from `start`; a state function's result as
        `shard_state` rebuilds the reader from the shards it still needs, else the epoch is replayed undecoded."""
        limit = self._reader_limit(slot, num_readers, plan)
        if limit is not None and start >= limit:
            return  # the reader's share of this epoch is already out
        reader = self._epoch_reader(seed, epoch, slot, num_readers, events, plan)
        if shard_state is None:
            first_index, raw = 0, reader.raw(0, 0)
        else:
            first_index, raw = start, reader.restore(shard_state)
        shuffled = enumerate(reader.shuffler.shuffle(raw), first_index)
        if limit is not None:
            shuffled = islice(shuffled, limit - first_index)
        for index, (_, sample) in shuffled:
            if index < start:
                # Damage read while replaying up to the checkpoint was already counted before it.
                events.clear()
                continue
            yield index, sample, reader.state

    def decode(self, sample: dict) -> tuple:
        """(RGB image, caption, reencoded, original (h, w)) of one raw sample, or SkipSample."""
        return decode_shard_sample(sample, self.rules)

    example = staticmethod(image_example)


def build_source(spec: DataSpec, rank: int):
    """The folder, dataset or shard source the spec names; shards written by lcm_utils.precompute (their first
    sample says so) become a latent source."""
    if spec.train_data_dir:
        return FolderSource(spec, count_listing=rank == 0)
    if spec.dataset_name:
        from .hf_dataset import DatasetSource

        return DatasetSource(spec)
    from .latents import LatentShardSource, read_header

    header = read_header(expand_shard_urls(spec.train_shards_path_or_url)[0])
    return ShardSource(spec) if header is None else LatentShardSource(spec, header)


# ----------------------------------------------------------------------------- readers


def _format_counts(counts: Counter) -> str:
    """'bad_image: 3, missing_caption: 1' in a stable order."""
    return ", ".join(f"{reason}: {counts[reason]}" for reason in sorted(counts)) or "none"


def _empty_epoch_error(source, slot: int, num_readers: int, epoch: int) -> DataError:
    """Error for a reader whose epoch has no raw samples at all."""
    return DataError(
        f"{source.description}: reader {slot} of {num_readers} got no samples in epoch {epoch}: the dataset "
        f"has fewer samples/shards than the {num_readers} readers (processes x max(1, --dataloader_num_workers)); "
        f"lower --dataloader_num_workers or the number of processes, or add data"
    )


def _unusable_epoch_error(source, slot: int, epoch: int, counts: Counter) -> DataError:
    """Error for a reader whose whole epoch was rejected; names the filter flags that rejected samples."""
    skipped = sum(counts[reason] for reason in counts if reason != REENCODED)
    filters = [f"--{reason[len(FILTER_PREFIX):]}" for reason in sorted(counts) if reason.startswith(FILTER_PREFIX)]
    fix = (f"loosen or unset {' / '.join(filters)}, or check the images and captions of the dataset" if filters
           else "check the images and captions of the dataset")
    return DataError(
        f"no usable samples in {source.description} (reader {slot}, epoch {epoch}): {skipped} skipped "
        f"({_format_counts(counts)}); {fix}"
    )


@dataclass
class ReaderSetup:
    """What one logical reader needs to produce its batches."""

    source: object
    transform: Transform
    seed: int
    slot: int
    num_readers: int
    batch_size: int
    logical_worker: int
    start_epoch: int
    start_index: int
    skipped: dict
    shard_state: Optional[str] = None  # JSON rebuild state of a shard reader at the start position
    plans: Optional[dict] = None  # {str(epoch): plan} of the epochs an elastic resume split anew


def _count(counters: tuple, reason: str) -> None:
    """Add one occurrence of `reason` to every counter (cumulative and this epoch's)."""
    for counter in counters:
        counter[reason] += 1


def _record_events(events: list, counters: tuple) -> None:
    """Move pending source events (shard damage) into the counters."""
    for reason in events:
        _count(counters, reason)
    events.clear()


def _decode_counted(source, raw, counters: tuple) -> Optional[tuple]:
    """(content, caption, original size) of a raw sample (content: an RGB image, or a precomputed sample's
    tensors), or None after counting why it was skipped."""
    try:
        content, caption, reencoded, size = source.decode(raw)
    except SkipSample as skip:
        _count(counters, skip.reason)
        return None
    if reencoded:
        _count(counters, REENCODED)
    return content, caption, size


def _check_full_epoch(setup: ReaderSetup, epoch: int, raw_count: int, usable: int, epoch_counts: Counter) -> None:
    """Fail instead of looping forever when a reader's whole epoch is empty or unusable."""
    if raw_count == 0 and not epoch_counts:
        raise _empty_epoch_error(setup.source, setup.slot, setup.num_readers, epoch)
    if usable == 0:
        raise _unusable_epoch_error(setup.source, setup.slot, epoch, epoch_counts)


def reader_batches(setup: ReaderSetup) -> Iterator[dict]:
    """Infinite batches of one reader, each carrying its position and cumulative skip counts."""
    skipped = Counter(setup.skipped)
    epoch, start = setup.start_epoch, setup.start_index
    shard_state = None if setup.shard_state is None else json.loads(setup.shard_state)
    examples = []
    while True:
        epoch_counts, events, raw_count, usable = Counter(), [], 0, 0
        counters = (skipped, epoch_counts)
        plan = (setup.plans or {}).get(str(epoch))
        samples = setup.source.iter_epoch(setup.seed, epoch, setup.slot, setup.num_readers, start, events, shard_state,
                                          plan)
        for index, raw, state_function in samples:
            _record_events(events, counters)
            raw_count += 1
            decoded = _decode_counted(setup.source, raw, counters)
            if decoded is None:
                continue
            usable += 1
            examples.append(setup.source.example(decoded, setup.transform,
                                                 sample_rng(setup.seed, epoch, setup.slot, index)))
            if len(examples) == setup.batch_size:
                batch = collate(examples)
                meta = {"worker": setup.logical_worker, "epoch": epoch, "emitted": index + 1}
                # A JSON string: the DataLoader would walk a buffer-long list item by item (~3 ms a batch).
                state = None if state_function is None else json.dumps(state_function())
                batch["_meta"] = {**meta, "skipped": dict(skipped), "shard_state": state}
                yield batch
                examples = []
        _record_events(events, counters)
        # Only a reader that saw the whole epoch can tell it is empty or all bad; the rest of an epoch that an
        # elastic resume split (a plan) may rightly leave a reader nothing.
        if start == 0 and plan is None:
            _check_full_epoch(setup, epoch, raw_count, usable, epoch_counts)
        epoch, start, shard_state = epoch + 1, 0, None


class ReaderDataset(IterableDataset):
    """The rank's readers as a DataLoader dataset; each worker forms whole batches of its reader."""

    def __init__(self, source, spec: DataSpec, seed: int, rank: int, world_size: int, rotation: int,
                 positions: list, skipped: list, shard_states: list, plans: dict):
        self.source = source
        self.transform = Transform.from_spec(spec)
        self.batch_size = spec.train_batch_size
        self.workers = readers_per_rank(spec)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rotation = rotation
        self.positions = positions
        self.skipped = skipped
        self.shard_states = shard_states
        self.plans = plans

    def _setup(self, physical_worker: int) -> ReaderSetup:
        """Reader of a physical worker: rotated so the worker asked first continues the saved order."""
        logical = (physical_worker + self.rotation) % self.workers
        epoch, index = self.positions[logical]
        return ReaderSetup(
            source=self.source,
            transform=self.transform,
            seed=self.seed,
            slot=self.rank * self.workers + logical,
            num_readers=self.world_size * self.workers,
            batch_size=self.batch_size,
            logical_worker=logical,
            start_epoch=epoch,
            start_index=index,
            skipped=self.skipped[logical],
            shard_state=self.shard_states[logical],
            plans=self.plans,
        )

    def __iter__(self):
        worker_info = get_worker_info()
        setup = self._setup(worker_info.id if worker_info is not None else 0)
        try:
            yield from reader_batches(setup)
        except DataError as error:
            # Sent as an item: DataLoader would otherwise re-raise it wrapped in a worker traceback.
            yield {"_error": str(error)}


# ----------------------------------------------------------------------------- the stream


class TrainStream:
    """Infinite stream of training batches for one process; resumable through state_dict()."""

    def __init__(self, spec: DataSpec, rank: int = 0, world_size: int = 1):
        check_data_spec(spec)
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.seed = spec.seed
        self.num_workers = readers_per_rank(spec)
        self._source = build_source(spec, rank)
        self.samples_per_epoch = self._source.samples_per_epoch
        # Shards written by lcm_utils.precompute: (header record, unconditional text tensors), else None.
        self.precomputed = getattr(self._source, "header", None)
        self.unconditional_text = getattr(self._source, "uncond_text", None)
        self._positions = [[0, 0] for _ in range(self.num_workers)]
        self._skipped = [{} for _ in range(self.num_workers)]
        # Per logical worker: JSON rebuild state of a shard reader after its last batch (None for folders).
        self._shard_states = [None] * self.num_workers
        self._batches_consumed = 0
        self._epoch = 0
        self._plans = {}  # {str(epoch): plan}: epochs split anew by an elastic resume

    @property
    def skipped(self) -> dict:
        """Cumulative counts by reason on this rank (its workers summed), caption_reencoded included."""
        total = Counter(self._source.listing_counts)
        for counts in self._skipped:
            total.update(counts)
        return {reason: total[reason] for reason in sorted(total) if total[reason]}

    @property
    def epoch(self) -> int:
        """Epoch of the most recently yielded batch."""
        return self._epoch

    def state_dict(self) -> dict:
        """JSON-serialisable position of every logical worker after the last consumed batch."""
        return {
            "seed": int(self.seed),
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batches_consumed": self._batches_consumed,
            "positions": [list(position) for position in self._positions],
            "skipped": [dict(counts) for counts in self._skipped],
            "epoch": self._epoch,
            "shard_states": [None if state is None else json.loads(state) for state in self._shard_states],
            "plans": {epoch: plan for epoch, plan in self._plans.items()
                      if int(epoch) >= min(position[0] for position in self._positions)},
            "source": getattr(self._source, "identity", None),
        }

    def _check_same_source(self, state: dict) -> None:
        """A position is only meaningful in the data it was taken in: refuse a dataset that changed since."""
        saved, now = state.get("source"), getattr(self._source, "identity", None)
        if saved and now and saved != now:
            raise DataError(
                f"{self._source.flag} '{now['dataset']}' changed since the checkpoint was written ({saved['rows']} rows, "
                f"fingerprint {saved['fingerprint']}; now {now['rows']} rows, {now['fingerprint']}); resume needs the "
                f"same data: restore it (or pin the Hub revision), or start a new run"
            )

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; call before iterating. The saved seed wins over spec.seed."""
        if state["world_size"] != self.world_size:
            raise DataError(
                f"the data position cannot be restored: the checkpoint ran on {state['world_size']} processes, "
                f"this run on {self.world_size}; resume with the same number of processes"
            )
        if state["num_workers"] != self.num_workers:
            raise DataError(
                f"the data position cannot be restored: --dataloader_num_workers changed (the checkpoint used "
                f"{state['num_workers']} data reader(s) per process, this run {self.num_workers}; 0 and 1 workers "
                f"both mean one); resume with the checkpoint's value"
            )
        if state.get("rank", self.rank) != self.rank:
            raise DataError(
                f"the data position cannot be restored: the state belongs to rank {state['rank']}, "
                f"not rank {self.rank}; save and load one data state per process"
            )
        self._check_same_source(state)
        self.seed = int(state["seed"])
        self._positions = [[int(epoch), int(index)] for epoch, index in state["positions"]]
        self._skipped = [{str(k): int(v) for k, v in counts.items()} for counts in state["skipped"]]
        # Checkpoints without shard states resume by replaying each shard reader's epoch from its start.
        shard_states = state.get("shard_states") or [None] * self.num_workers
        self._shard_states = [None if saved is None else json.dumps(saved) for saved in shard_states]
        self._batches_consumed = int(state["batches_consumed"])
        self._epoch = int(state.get("epoch", min(epoch for epoch, _ in self._positions)))
        self._plans = dict(state.get("plans") or {})

    def load_elastic(self, states: list) -> None:
        """Continue from the data states of every rank of a run with another number of processes or workers, at the
        same global sample position: each epoch an old reader was still in is split anew between this layout's
        readers, less what any old reader used (shard readers' buffered samples included). Call before iterating."""
        states = sorted(states, key=lambda state: state["rank"])
        self._check_same_source(states[0])
        old_workers = int(states[0]["num_workers"])
        old_readers = len(states) * old_workers
        readers = [{"slot": state["rank"] * old_workers + worker, "epoch": int(state["positions"][worker][0]),
                    "emitted": int(state["positions"][worker][1]),
                    "shard_state": (state.get("shard_states") or [None] * old_workers)[worker]}
                   for state in states for worker in range(old_workers)]
        seed, old_plans = int(states[0]["seed"]), {}
        for state in states:  # each rank keeps the plans of the epochs its own readers may still be in
            old_plans.update(state.get("plans") or {})
        first, last = min(r["epoch"] for r in readers), max(r["epoch"] for r in readers)
        # An earlier switch may have split an epoch that none of these readers has reached yet: keep splitting it.
        last = max([last] + [int(epoch) for epoch in old_plans])
        self.seed = seed
        new_readers = self.world_size * self.num_workers
        self._plans = {str(epoch): self._source.elastic_plan(seed, epoch, readers, old_readers,
                                                               old_plans.get(str(epoch)), new_readers)
                       for epoch in range(first, last + 1)}
        self._positions = [[first, 0] for _ in range(self.num_workers)]
        self._shard_states = [None] * self.num_workers
        totals = Counter()  # the skip counts so far, kept once: on rank 0's first reader
        for state in states:
            for counts in state["skipped"]:
                totals.update(counts)
        self._skipped = [dict(totals) if self.rank == 0 and worker == 0 else {} for worker in range(self.num_workers)]
        self._batches_consumed = 0
        self._epoch = first

    def _loader(self) -> DataLoader:
        """DataLoader whose workers continue from the recorded positions."""
        dataset = ReaderDataset(
            self._source, self.spec, self.seed, self.rank, self.world_size,
            rotation=self._batches_consumed % self.num_workers,
            positions=[list(position) for position in self._positions],
            skipped=[dict(counts) for counts in self._skipped],
            shard_states=list(self._shard_states),
            plans=dict(self._plans),
        )
        workers = self.spec.dataloader_num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
            # Pinned batches copy to a GPU without the host waiting for the device's queue.
            pin_memory=torch.cuda.is_available(),
            # Without its own generator, starting the loader draws from the global torch RNG (for worker
            # base seeds), which would shift every later global draw (e.g. dropout) on resume.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def __iter__(self) -> Iterator[dict]:
        """Batches without end; a second iteration continues where the first stopped."""
        for batch in self._loader():
            if "_error" in batch:
                raise ReaderError(batch["_error"])
            meta = batch.pop("_meta")
            worker = meta["worker"]
            self._positions[worker] = [meta["epoch"], meta["emitted"]]
            self._skipped[worker] = meta["skipped"]
            self._shard_states[worker] = meta["shard_state"]
            self._batches_consumed += 1
            self._epoch = meta["epoch"]
            yield batch
