"""Deterministic, resumable training stream of one process: its readers (DataLoader workers) over one source.

Every random choice (epoch order, shuffle buffer, crop, flip, empty prompt) is drawn from numpy
generators seeded by (seed, epoch, reader slot, sample index), so a stream restored from
`TrainStream.state_dict()` yields bitwise the same batches as one that never stopped. A shard reader's
state names the samples in its shuffle buffer, so a resume reopens only the shards that still hold them.
"""

import json
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError, ReaderError
from .samples import FILTER_PREFIX, REENCODED, SkipSample, Transform, collate, sample_rng
from .sources import build_source, check_data_spec
from .spec import DataSpec, readers_per_rank

PREFETCH_FACTOR = 2


def format_counts(counts: Counter) -> str:
    """'bad_image: 3, missing_caption: 1' in a stable order."""
    return ", ".join(f"{reason}: {counts[reason]}" for reason in sorted(counts)) or "none"


def tracker_name(reason: str) -> str:
    """The tracker key of a count: data/skipped_<reason> for a dropped sample, data/repaired_<reason> for a kept one."""
    return f"data/{'repaired' if reason == REENCODED else 'skipped'}_{reason}"


def data_report(counts: dict, used: int):
    """(one line, share dropped, filter flags that dropped some) on what the data lost: broken samples (bad data),
    filtered ones (a rule the user set) and repaired ones (kept), each by reason; the share is of the samples read
    (`used` ones were trained on)."""
    groups = {"broken": {}, "filtered": {}, "repaired": {}}
    for reason, n in sorted(counts.items()):
        if reason == REENCODED:
            groups["repaired"][reason] = n
        elif reason.startswith(FILTER_PREFIX):
            groups["filtered"]["--" + reason[len(FILTER_PREFIX):]] = n
        else:
            groups["broken"][reason] = n
    dropped = sum(groups["broken"].values()) + sum(groups["filtered"].values())
    share = dropped / max(used + dropped, 1)
    parts = [f"{sum(group.values())} {kind} ({', '.join(f'{reason} {n}' for reason, n in group.items())})"
             for kind, group in groups.items() if group]
    line = f"data: {', '.join(parts)}; {dropped} of {used + dropped} samples read were dropped ({share:.1%})"
    return line, share, sorted(groups["filtered"])


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
        f"({format_counts(counts)}); {fix}"
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
        # Shards written by lcm_utils.precompute: their header record and unconditional text tensors, else None.
        self.precomputed = self._source.header
        self.unconditional_text = self._source.unconditional_text
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
            "source": self._source.identity,
        }

    def _check_same_source(self, state: dict) -> None:
        """A position is only meaningful in the data it was taken in: refuse a dataset that changed since."""
        saved, now = state.get("source"), self._source.identity
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
