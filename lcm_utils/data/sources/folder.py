"""An image folder (--train_data_dir): images below it, captions in metadata.jsonl or a .txt next to each image."""

import json
import os
import posixpath

from ...errors import DataError
from ..samples import IMAGE_EXTENSIONS, decode_image, decode_sample, read_file, text_caption
from .base import IndexableSource

METADATA_FILE = "metadata.jsonl"


def _is_image_file(name: str) -> bool:
    """Image file by extension, case-insensitive."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _has_image(root: str) -> bool:
    """Whether the folder holds at least one image anywhere below it; stops at the first."""
    for _, _, names in os.walk(root):
        if any(_is_image_file(name) for name in names):
            return True
    return False


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


class FolderSource(IndexableSource):
    """Images below a folder with captions from metadata.jsonl or sidecar .txt files."""

    flag, field, kind = "--train_data_dir", "train_data_dir", "an image folder"

    def __init__(self, spec, rank: int = 0):
        super().__init__(spec, rank)
        self.root = self.location
        self.items = list_images(self.root)
        if spec.max_train_samples is not None:
            self.items = self.items[: spec.max_train_samples]
        self.records = None
        self.caption_column = spec.caption_column
        metadata_path = os.path.join(self.root, METADATA_FILE)
        # 'image' is the column that load_dataset("imagefolder") makes of the file_name key: the same thing here.
        image_key = "file_name" if spec.image_column in (None, "image") else spec.image_column
        if os.path.isfile(metadata_path):
            self.records, malformed = read_metadata(metadata_path, image_key)
            if rank == 0 and malformed:
                self.listing_counts["bad_metadata"] = malformed

    @classmethod
    def check(cls, spec) -> None:
        """The folder exists and holds at least one image."""
        root = spec.train_data_dir
        if not os.path.isdir(root):
            raise DataError(f"--train_data_dir: folder '{root}' does not exist; point it at a folder of images")
        if not _has_image(root):
            extensions = "/".join(f".{ext}" for ext in IMAGE_EXTENSIONS)
            raise DataError(
                f"--train_data_dir: folder '{root}' holds no images ({extensions}); point it at a folder of "
                f"images with captions in {METADATA_FILE} or in a .txt file next to each image"
            )

    @property
    def num_items(self) -> int:
        return len(self.items)

    def metadata(self, item: int) -> dict:
        return (self.records or {}).get(self.items[item], {})

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
        caption, reencoded = self._caption_bytes_or_value(relative), False
        if isinstance(caption, bytes):
            caption, reencoded = text_caption(caption)
        return decode_sample(caption, reencoded, self.metadata(item),
                             lambda: decode_image(read_file(self.root, relative)), self.rules)
