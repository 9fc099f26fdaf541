"""Webdataset tar shards: reading them sample by sample (damage counted, never fatal), the seeded shuffle buffer, and
one reader's epoch of shards with a state that resumes it without reading again what it no longer needs."""

import posixpath
import tarfile
import zlib
from itertools import chain
from typing import Iterator, Optional
from urllib.parse import urlparse

import numpy as np
from webdataset import gopen
from webdataset.shardlists import expand_urls

from .samples import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS

# Only these tar members are ever read into memory; anything else (.pth, .pyd, .pickle, ...) is
# dropped unread so no untrusted object is ever unpickled.
# "safetensors": the latents and text embeddings of shards written by lcm_utils.precompute.
DECODED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS + ("safetensors",))
# Key of the first sample of a precomputed shard: what wrote it, not a training sample (see sources/latents.py).
HEADER_KEY = "__precomputed__"
# Stands in the raw sample stream where a shard could not be read to its end.
SHARD_DAMAGED = "truncated_shard"


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
