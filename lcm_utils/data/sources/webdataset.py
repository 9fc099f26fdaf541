"""Webdataset tar shards (--train_shards_path_or_url): a local path, brace pattern, '::'-joined list or 'pipe:'
command; split between readers by shard (or by sample when there are fewer shards than readers)."""

import math
import os
from functools import partial
from itertools import islice
from typing import Optional

import numpy as np

from ...errors import DataError
from ..samples import (IMAGE_EXTENSIONS, SkipSample, decode_image, decode_sample, json_caption, json_record,
                       text_caption)
from ..shards import (SHARD_DAMAGED, ShardEpoch, ShuffleBuffer, _is_local, _local_path, expand_shard_urls,
                      read_shard)
from .base import Source


def shard_metadata(sample: dict) -> dict:
    """A raw tar sample's metadata: its json as a dict, else {}."""
    return json_record(sample["json"]) if "json" in sample else {}


def _split(total, parts, part):
    """Size of part `part` when `total` is split as evenly as possible into `parts`."""
    return total // parts + (part < total % parts)


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


class ShardSource(Source):
    """Samples of webdataset tar shards, split between readers by shard or by sample index."""

    flag, field, kind = "--train_shards_path_or_url", "train_shards_path_or_url", "webdataset shards"

    def __init__(self, spec, rank: int = 0):
        super().__init__(spec, rank)
        self.urls = expand_shard_urls(self.location)
        self.buffer_size = spec.shuffle_buffer_size
        self.max_train_samples = spec.max_train_samples

    @classmethod
    def check(cls, spec) -> None:
        """Every local shard named by the pattern exists; pipe: and remote urls are not checked."""
        pattern = spec.train_shards_path_or_url
        urls = expand_shard_urls(pattern)
        if not urls:
            raise DataError(f"--train_shards_path_or_url: '{pattern}' expands to no shards")
        missing = [url for url in urls if _is_local(url) and not os.path.isfile(_local_path(url))]
        if missing:
            raise DataError(
                f"--train_shards_path_or_url: shard file '{missing[0]}' does not exist "
                f"({len(missing)} of {len(urls)} expanded shards missing); check the path and the brace range"
            )

    @classmethod
    def build(cls, spec, rank: int) -> Source:
        """Shards written by lcm_utils.precompute (their first sample says so) are read as precomputed latents."""
        from .latents import LatentShardSource, read_header

        header = read_header(expand_shard_urls(spec.train_shards_path_or_url)[0])
        return cls(spec, rank) if header is None else LatentShardSource(spec, header, rank)

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
        """(RGB image, caption, reencoded, original (h, w)) of one raw tar sample, or SkipSample."""
        image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_bytes is None:
            raise SkipSample("missing_image")
        reencoded = False
        if "txt" in sample:
            caption, reencoded = text_caption(sample["txt"])
        elif "json" in sample:
            caption = json_caption(sample["json"])
        else:
            caption = None
        return decode_sample(caption, reencoded, shard_metadata(sample), lambda: decode_image(image_bytes),
                             self.rules)

    def metadata(self, sample: dict) -> dict:
        return shard_metadata(sample)

    def unit_samples(self, samples_per_shard):
        """One unit per input shard (output shards map one to one, sample order kept), each at most its share of
        --max_train_samples."""
        limits = [None if self.max_train_samples is None else _split(self.max_train_samples, len(self.urls), j)
                  for j in range(len(self.urls))]
        return [partial(counted_samples, url, limits[j]) for j, url in enumerate(self.urls)]


def counted_samples(url: str, limit: Optional[int]):
    """(index, raw sample) of a shard's first `limit` samples; damage, counted apart, takes no index."""
    count = 0
    for sample in read_shard(url):
        if limit is not None and count >= limit:
            return
        yield count, sample
        if sample is not SHARD_DAMAGED:
            count += 1
