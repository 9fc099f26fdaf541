"""Hugging Face datasets as a data source (--dataset_name): a map-style 'train' split read by index.

Indexable, so it is read like the image folder: each epoch is a seeded permutation of the row numbers, split
between readers, and a reader's position alone resumes it exactly. `datasets` is imported only here, only
when --dataset_name is used.
"""

import importlib.util
import os

import numpy as np

from ...errors import DataError
from ..samples import SkipSample, decode_image, decode_sample, read_file
from .base import IndexableSource, permuted_share

# Files that Dataset.save_to_disk / DatasetDict.save_to_disk write: such a folder loads with load_from_disk.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


def load_train_split(spec):
    """The 'train' split of --dataset_name (Hub name, local dataset folder, or a save_to_disk folder)."""
    import datasets

    name = os.path.expanduser(spec.dataset_name)
    try:
        if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in SAVED_DATASET_FILES):
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, spec.dataset_config_name, cache_dir=spec.cache_dir)
    except Exception as e:  # offline Hub, bad config name, unreadable files: one line, not a traceback
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise DataError(f"--dataset_name: cannot load '{spec.dataset_name}' ({type(e).__name__}: {first})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"--dataset_name: '{spec.dataset_name}' has no 'train' split (it has "
                            f"{', '.join(loaded)}); the trainer reads the train split")
        loaded = loaded["train"]
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"--dataset_name: '{spec.dataset_name}' loaded as a streaming dataset; a map-style dataset "
                        f"is needed for a deterministic, resumable order")
    return loaded


class DatasetSource(IndexableSource):
    """Rows of a datasets.Dataset: an image column (Image feature, bytes, or a file path) and a caption column
    (a string, or a list of captions of which each visit draws one). Other columns are the sample's metadata
    (original size, pwatermark, aesthetic), as a LAION json is for shards."""

    flag, field, kind = "--dataset_name", "dataset_name", "a Hugging Face dataset"

    def __init__(self, spec, rank: int = 0):
        import datasets

        super().__init__(spec, rank)
        dataset = load_train_split(spec)
        self.image_column, self.caption_column = spec.image_column or "image", spec.caption_column
        for flag, column in (("--image_column", self.image_column), ("--caption_column", self.caption_column)):
            if column not in dataset.column_names:
                raise DataError(f"{flag}: '{column}' is not a column of --dataset_name '{self.location}' (columns: "
                                f"{', '.join(dataset.column_names)})")
        if isinstance(dataset.features[self.image_column], datasets.Image):
            # Undecoded bytes: images go through the same guarded decoder as every other source.
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.images = dataset.select_columns([self.image_column])
        self.rows = dataset.remove_columns([self.image_column])
        self.num_rows = len(dataset)
        self.size = self.num_rows if spec.max_train_samples is None else min(self.num_rows, spec.max_train_samples)
        # What a checkpoint records to notice a dataset that changed (datasets' fingerprint hashes the data files).
        self.identity = {"dataset": self.location, "rows": self.num_rows, "fingerprint": dataset._fingerprint}
        self._subset = {}

    def subset(self, seed: int):
        """Row numbers of --max_train_samples: a seeded random subset, the one diffusers' datasets scripts take
        (`shuffle(seed).select(range(N))`, a numpy PCG64 permutation); None without the flag: [size] int64."""
        if self.size == self.num_rows:
            return None
        if seed not in self._subset:
            self._subset[seed] = np.random.default_rng(seed).permutation(self.num_rows)[:self.size]
        return self._subset[seed]

    @classmethod
    def check(cls, spec) -> None:
        """The datasets package is installed, and a local-looking dataset path exists (a Hub name is not checked)."""
        if importlib.util.find_spec("datasets") is None:
            raise DataError("--dataset_name needs the 'datasets' package: pip install datasets")
        name = spec.dataset_name
        if name.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(name)):
            raise DataError(f"--dataset_name: '{name}' does not exist; pass a dataset folder or a Hub dataset name")

    @property
    def num_items(self) -> int:
        return self.size

    def metadata(self, row: int) -> dict:
        return self.rows[row]

    def iter_epoch(self, seed, epoch, slot, num_readers, start, events, shard_state=None, plan=None):
        """(index, row number, None) of this reader's share of the epoch permutation, from `start`."""
        rows = self.subset(seed)
        for index, item, state in permuted_share(self.size, seed, epoch, slot, num_readers, start, plan):
            yield index, item if rows is None else int(rows[item]), state

    def _image(self, row: int):
        value = self.images[row][self.image_column]
        if value is None:
            raise SkipSample("missing_image")
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return decode_image(value["bytes"])
            value = value.get("path")
        if isinstance(value, str) and value:
            return decode_image(read_file("", value))
        raise SkipSample("bad_image")

    def decode(self, row: int) -> tuple:
        """(RGB image, caption, reencoded, original (h, w)) of one row, or SkipSample."""
        meta = self.rows[row]
        return decode_sample(meta.get(self.caption_column), False, meta, lambda: self._image(row), self.rules)
