"""Elastic resume of the data stream: a position saved by P processes x W workers continues on P' x W' with every
sample of the interrupted epochs seen exactly once across the switch."""

import json

import pytest

from lcm_utils.data import DataError, TrainStream
from test_data import spec_for, write_folder, write_shards


def epoch_captions(stream, batches):
    """Captions of `batches` batches (batch size 1), grouped by the epoch each came from."""
    by_epoch = {}
    iterator = iter(stream)
    for _ in range(batches):
        batch = next(iterator)
        by_epoch.setdefault(stream.epoch, []).extend(batch["captions"])
    return by_epoch


def rest_of_epochs(stream, last_epoch, batches=80):
    """Captions by epoch up to `last_epoch`, from enough batches that every reader of the stream (each worker is
    one, and they take turns) has gone past it."""
    by_epoch, iterator = {}, iter(stream)
    for _ in range(batches):
        batch = next(iterator)
        if stream.epoch <= last_epoch:
            by_epoch.setdefault(stream.epoch, []).extend(batch["captions"])
    return by_epoch


def switch(spec_kwargs, old_layout, new_layout, taken):
    """Run the old layout (world, workers) for `taken[rank]` batches per rank, resume elastically on the new one;
    returns ({epoch: captions used before}, {epoch: captions read after}, the new streams)."""
    old_world, old_workers = old_layout
    states, used = [], {}
    for rank in range(old_world):
        stream = TrainStream(spec_for(dataloader_num_workers=old_workers, **spec_kwargs), rank, old_world)
        for epoch, captions in epoch_captions(stream, taken[rank]).items():
            used.setdefault(epoch, []).extend(captions)
        states.append(json.loads(json.dumps(stream.state_dict())))
    new_world, new_workers = new_layout
    after, streams = {}, []
    last = max(max(used), *(s["epoch"] for s in states))
    for rank in range(new_world):
        stream = TrainStream(spec_for(dataloader_num_workers=new_workers, **spec_kwargs), rank, new_world)
        stream.load_elastic(states)
        streams.append(stream)
        for epoch, captions in rest_of_epochs(stream, last).items():
            after.setdefault(epoch, []).extend(captions)
    return used, after, streams


@pytest.mark.parametrize("old_layout, new_layout", [((1, 1), (2, 1)), ((2, 1), (1, 1)), ((2, 2), (3, 1)),
                                                    ((1, 2), (1, 3))])
def test_folder_switch_sees_every_sample_of_the_epoch_once(tmp_path, old_layout, new_layout):
    captions = write_folder(tmp_path / "data", 24)
    readers = old_layout[0] * old_layout[1]
    taken = [5 if rank == 0 else 2 for rank in range(old_layout[0])]
    used, after, streams = switch(dict(train_data_dir=str(tmp_path / "data"), train_batch_size=1, random_flip=True),
                                  old_layout, new_layout, taken)
    assert sorted(used[0] + after[0]) == sorted(captions), (readers, used, after)
    assert set(after) == {0}


def test_folder_switch_when_old_readers_stand_in_different_epochs(tmp_path):
    """Rank 0 went past the end of its share into epoch 1 while rank 1 is still in epoch 0: both epochs resume."""
    captions = write_folder(tmp_path / "data", 12)
    used, after, _ = switch(dict(train_data_dir=str(tmp_path / "data"), train_batch_size=1), (2, 1), (3, 1), [8, 2])
    assert set(used) == {0, 1}
    for epoch in (0, 1):
        assert sorted(used.get(epoch, []) + after.get(epoch, [])) == sorted(captions), epoch


@pytest.mark.parametrize("old_layout, new_layout, taken", [((2, 1), (1, 1), [4, 3]), ((1, 2), (3, 1), [7]),
                                                           ((2, 1), (2, 2), [9, 1])])
def test_shard_switch_sees_every_sample_once_shuffle_buffers_included(tmp_path, old_layout, new_layout, taken):
    write_shards(tmp_path, "s", 6, 5)
    everything = [f"s{k}_ caption {i}" for k in range(6) for i in range(5)]
    used, after, _ = switch(dict(train_shards_path_or_url=str(tmp_path / "s-{0..5}.tar"), train_batch_size=1,
                                 shuffle_buffer_size=4), old_layout, new_layout, taken)
    assert sorted(used[0] + after[0]) == sorted(everything)


def test_shard_switch_keeps_the_epoch_length(tmp_path):
    """With --max_train_samples an epoch is that many samples; the switched epoch ends at the same total."""
    write_shards(tmp_path, "s", 6, 5)
    used, after, _ = switch(dict(train_shards_path_or_url=str(tmp_path / "s-{0..5}.tar"), train_batch_size=1,
                                 shuffle_buffer_size=4, max_train_samples=20), (2, 1), (1, 2), [4, 3])
    assert len(used[0]) + len(after[0]) == 20 and len(set(used[0] + after[0])) == 20


def test_a_switched_stream_resumes_exactly_and_switches_again(tmp_path):
    """The elastic epoch's split is part of the state: the new layout's checkpoints resume bit for bit, and a second
    switch still sees every sample once."""
    from test_data import assert_batches_equal, take

    write_shards(tmp_path, "s", 6, 5)
    kwargs = dict(train_shards_path_or_url=str(tmp_path / "s-{0..5}.tar"), train_batch_size=1, shuffle_buffer_size=4)
    used, _, _ = switch(kwargs, (2, 1), (1, 1), [3, 3])
    old = []
    for rank in range(2):
        stream = TrainStream(spec_for(**kwargs), rank, 2)
        take(stream, 3)
        old.append(json.loads(json.dumps(stream.state_dict())))
    first = TrainStream(spec_for(**kwargs))
    first.load_elastic(old)
    middle = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    expected = take(first, 6)
    again = TrainStream(spec_for(**kwargs))
    again.load_state_dict(state)
    assert_batches_equal(expected, take(again, 6))

    # Switch again, from the 1-reader layout (after 5 batches) to 3 readers: epoch 0 still covered once.
    seen = used[0] + [c for b in middle for c in b["captions"]]
    thirds = []
    for rank in range(3):
        stream = TrainStream(spec_for(**kwargs), rank, 3)
        stream.load_elastic([state])
        thirds += rest_of_epochs(stream, 0).get(0, [])
    assert sorted(seen + thirds) == sorted(f"s{k}_ caption {i}" for k in range(6) for i in range(5))


def test_too_few_shards_for_an_elastic_split_is_a_clear_error(tmp_path):
    write_shards(tmp_path, "s", 1, 6)
    stream = TrainStream(spec_for(train_shards_path_or_url=str(tmp_path / "s-0.tar"), train_batch_size=1,
                                  dataloader_num_workers=2))
    take_state = json.loads(json.dumps((next(iter(stream)), stream.state_dict())[1]))
    new = TrainStream(spec_for(train_shards_path_or_url=str(tmp_path / "s-0.tar"), train_batch_size=1))
    with pytest.raises(DataError, match="resume with the processes and --dataloader_num_workers that wrote it"):
        new.load_elastic([take_state])


def test_a_run_resumes_on_two_processes_from_one_and_on_one_from_two(assets, tmp_path):
    """Through the script: a 1-process checkpoint continues on 2 processes (with data workers), that run's
    2-process checkpoint continues on 1; each says it is an elastic resume and trains to the end."""
    import os
    import shutil

    from conftest import base_args, check_ok, launch

    out = str(tmp_path / "out")
    args = base_args(assets, out, max_train_steps=4, checkpointing_steps=2, random_flip=True)
    check_ok(launch("train_lcm_distill.py", args))
    for later in ("checkpoint-4", "unet", "unet_target", "exported.json"):
        path = os.path.join(out, later)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    result = launch("train_lcm_distill.py", args + ["--resume_from_checkpoint", "latest", "--dataloader_num_workers",
                                                    "2"], num_processes=2)
    check_ok(result)
    assert "elastic resume:" in result.stdout and "1 process(es) x 1 data reader(s), this run has 2 x 2" in result.stdout
    assert os.path.isfile(os.path.join(out, "checkpoint-4", "rank_1.json"))

    extended = [a if a != "4" else "6" for a in args]  # --max_train_steps 6
    result = launch("train_lcm_distill.py", extended + ["--resume_from_checkpoint", "latest"])
    check_ok(result)
    assert "2 process(es) x 2 data reader(s), this run has 1 x 1" in result.stdout
    assert f"resumed from {os.path.join(out, 'checkpoint-4')} at step 4" in result.stdout
    assert json.load(open(os.path.join(out, "exported.json")))["step"] == 6


def test_dataset_switch_sees_every_row_once(tmp_path):
    from test_data_sources import save_dataset

    folder = save_dataset(tmp_path / "ds", count=14)
    used, after, _ = switch(dict(dataset_name=folder, train_batch_size=1), (2, 1), (1, 2), [4, 2])
    assert sorted(used[0] + after[0]) == sorted(f"caption {i}" for i in range(14))


def test_a_second_switch_keeps_the_split_of_an_epoch_no_reader_has_reached(tmp_path):
    """First switch: old readers stood in epochs 0 and 1, so epoch 1 got a plan. The new layout switches again while
    all its readers are still in epoch 0: epoch 1's plan must survive, or its used samples come round again."""
    captions = sorted(write_folder(tmp_path / "data", 10))
    kwargs = dict(train_data_dir=str(tmp_path / "data"), train_batch_size=1)
    used, states = {}, []
    for rank, count in enumerate([2, 8, 7]):  # 3 readers; shares of 3-4: ranks 1 and 2 go into epoch 1
        stream = TrainStream(spec_for(**kwargs), rank, 3)
        for epoch, got in epoch_captions(stream, count).items():
            used.setdefault(epoch, []).extend(got)
        states.append(json.loads(json.dumps(stream.state_dict())))
    middle = TrainStream(spec_for(dataloader_num_workers=2, **kwargs))
    middle.load_elastic(states)  # nothing read on this layout: its readers all stand at epoch 0
    again = TrainStream(spec_for(**kwargs))
    again.load_elastic([json.loads(json.dumps(middle.state_dict()))])
    after = rest_of_epochs(again, 1, batches=40)
    for epoch in (0, 1):
        assert sorted(used.get(epoch, []) + after.get(epoch, [])) == captions, epoch


def test_shard_switch_with_an_epoch_length_and_long_shards(tmp_path):
    """Two long shards, a big shuffle buffer: the new readers' segments differ in length (buffered samples, the
    rest of a shard, a whole shard), yet the switched epoch still ends at --max_train_samples, each sample once."""
    write_shards(tmp_path, "s", 2, 15)
    for taken in (1, 3):
        used, after, _ = switch(dict(train_shards_path_or_url=str(tmp_path / "s-{0..1}.tar"), train_batch_size=1,
                                     shuffle_buffer_size=8, max_train_samples=20), (1, 1), (2, 1), [taken])
        epoch = used[0] + after.get(0, [])
        assert len(epoch) == 20 and len(set(epoch)) == 20, (taken, len(epoch))
