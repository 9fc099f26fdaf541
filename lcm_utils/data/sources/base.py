"""The one protocol every data source follows, as a base class; indexable sources (a folder, a dataset) share the
seeded permutation of their items, split between readers and resumable from a position alone."""

import zlib
from collections import Counter
from functools import partial
from typing import Optional

import numpy as np

from ..samples import SampleRules, SkipSample, image_example
from ..shards import SHARD_DAMAGED


class Source:
    """A data source: what the stream reads (one epoch of a reader at a time), how a raw sample decodes, and what
    precompute encodes. Subclasses set the flag that selects them and implement the reading."""

    flag = None  # the flag that selects this source
    field = None  # that flag's DataSpec field
    kind = ""  # what the flag names, for the "no training data" message
    identity = None  # what a checkpoint records to notice data that changed since (datasets)
    header = None  # a precomputed shard's header record (precomputed latents only)
    unconditional_text = None  # the unconditional text conditions of precomputed shards
    example = staticmethod(image_example)  # decoded sample -> training example

    def __init__(self, spec, rank: int = 0):
        self.location = getattr(spec, self.field)  # the flag's value: a folder, a shard pattern, a dataset name
        self.rules = SampleRules.from_spec(spec)
        # Problems found while listing the source are global, so only rank 0 counts them.
        self.listing_counts = Counter()

    @classmethod
    def check(cls, spec) -> None:
        """Cheap validation of the source's flags before anything loads (DataError naming the flag)."""

    @classmethod
    def build(cls, spec, rank: int) -> "Source":
        """The source the spec names (shards may turn out to be precomputed latents)."""
        return cls(spec, rank)

    @property
    def description(self) -> str:
        """Where the samples come from, for messages."""
        return f"{self.flag} '{self.location}'"

    @property
    def samples_per_epoch(self) -> Optional[int]:
        """Global samples per epoch (None when unknown)."""
        raise NotImplementedError

    def iter_epoch(self, seed: int, epoch: int, slot: int, num_readers: int, start: int, events: list,
                   shard_state: Optional[dict] = None, plan: Optional[dict] = None):
        """(index, raw sample, state function or None) of a reader's share of the epoch, from `start`."""
        raise NotImplementedError

    def elastic_plan(self, seed, epoch, readers, num_readers, plan, new_readers) -> dict:
        """The rest of `epoch` after an old reader layout, for a new one (an elastic resume)."""
        raise NotImplementedError

    def decode(self, raw) -> tuple:
        """(content, caption, reencoded, original (h, w)) of one raw sample, or SkipSample."""
        raise NotImplementedError

    def metadata(self, raw) -> dict:
        """A raw sample's metadata record (precompute keeps its filter fields)."""
        return {}

    def unit_samples(self, samples_per_shard: int) -> list:
        """Per output shard of precompute, a function giving its (index, raw sample or SHARD_DAMAGED) pairs."""
        raise NotImplementedError

    def precompute_units(self, samples_per_shard: int) -> list:
        """[(output shard name, function giving (index, decoded or skip reason, metadata) per sample)] in a fixed
        order: what lcm_utils.precompute encodes, one output shard per unit."""
        return [(f"latents-{j:06d}.tar", partial(self._decoded, unit))
                for j, unit in enumerate(self.unit_samples(samples_per_shard))]

    def _decoded(self, unit):
        """(index, (image, caption, original (h, w)) or skip reason, metadata) of each sample of a unit."""
        for index, raw in unit():
            if raw is SHARD_DAMAGED:
                yield index, raw, {}
                continue
            try:
                image, caption, _, size = self.decode(raw)
            except SkipSample as skip:
                yield index, skip.reason, {}
                continue
            yield index, (image, caption, size), self.metadata(raw)


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


class IndexableSource(Source):
    """Items read by number: each epoch a seeded permutation of them, split between readers."""

    @property
    def num_items(self) -> int:
        raise NotImplementedError

    @property
    def samples_per_epoch(self) -> int:
        return self.num_items

    def iter_epoch(self, seed, epoch, slot, num_readers, start, events, shard_state=None, plan=None):
        """(index, item number, None) of this reader's share of the epoch permutation, from `start`."""
        return permuted_share(self.num_items, seed, epoch, slot, num_readers, start, plan)

    def elastic_plan(self, seed, epoch, readers, num_readers, plan, new_readers):
        return indexable_elastic_plan(self.num_items, seed, epoch, readers, num_readers, plan)

    def unit_samples(self, samples_per_shard):
        """Runs of --samples_per_shard items, in item order."""
        size, per = self.num_items, samples_per_shard
        return [partial(numbered, range(j * per, min(size, (j + 1) * per))) for j in range(-(-size // per))]


def numbered(items: range):
    """(index, item number) pairs of a run of items: an item is its own index."""
    return zip(items, items)
