"""Tests of lcm_utils.data: sources, splitting, determinism, resume, bad samples, transforms, checks."""

import io
import json
import os
import pickle
import tarfile
import time
import warnings
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_utils.data import shards as data_module
from lcm_utils.data import DataError, DataSpec, TrainStream, check_data_spec

# ----------------------------------------------------------------------------- builders


def image_bytes(size=(12, 10), color=(200, 100, 50), mode="RGB", fmt="PNG") -> bytes:
    """Encoded solid image of (width, height) `size`."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def noise_png(size=(16, 16), seed=0) -> bytes:
    """PNG of random pixels: large enough that cutting it in half breaks the pixel data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def colour_of(index: int) -> tuple:
    """A distinct colour per sample index, so pixels identify samples too."""
    return (index * 37 % 256, index * 91 % 256, 255 - index * 13 % 256)


def write_tar(path, samples) -> str:
    """Tar of [(key, {ext: bytes})] in order."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for extension, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def good_samples(prefix: str, count: int, size=(12, 10)) -> list:
    """Image + txt caption samples named '{prefix}{i}'."""
    return [
        (f"{prefix}{i:03d}", {"png": image_bytes(size, colour_of(i)), "txt": f"{prefix} caption {i}".encode()})
        for i in range(count)
    ]


def write_shards(folder, name: str, shard_count: int, per_shard: int) -> list:
    """Shards '{name}-{k}.tar' of good samples with captions '{name}{k}_ caption i'."""
    os.makedirs(folder, exist_ok=True)
    return [
        write_tar(os.path.join(folder, f"{name}-{k}.tar"), good_samples(f"{name}{k}_", per_shard))
        for k in range(shard_count)
    ]


def write_folder(root, count: int, captions="metadata", size=(12, 10)) -> list:
    """Image folder with captions 'caption i' in metadata.jsonl or .txt files; returns the captions."""
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    lines, texts = [], []
    for i in range(count):
        relative = f"sub/img{i:02d}.png" if i % 3 == 0 else f"img{i:02d}.png"
        with open(os.path.join(root, relative), "wb") as file:
            file.write(image_bytes(size, colour_of(i)))
        text = f"caption {i}"
        texts.append(text)
        if captions == "metadata":
            lines.append(json.dumps({"file_name": relative, "text": text}))
        else:
            with open(os.path.join(root, os.path.splitext(relative)[0] + ".txt"), "w") as file:
                file.write(text)
    if captions == "metadata":
        with open(os.path.join(root, "metadata.jsonl"), "w") as file:
            file.write("\n".join(lines) + "\n")
    return texts


def spec_for(**overrides) -> DataSpec:
    """Small fast spec: resolution 8, batch 4, nearest filter."""
    values = dict(resolution=8, train_batch_size=4, interpolation_type="nearest", shuffle_buffer_size=4)
    values.update(overrides)
    return DataSpec(**values)


def take(stream, count: int) -> list:
    """The next `count` batches of a stream."""
    return list(islice(iter(stream), count))


def captions_of(batches) -> list:
    """All captions of a list of batches, in order."""
    return [caption for batch in batches for caption in batch["captions"]]


def assert_batches_equal(expected: list, actual: list) -> None:
    """Bitwise equality of batch lists."""
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert want["captions"] == got["captions"]
        assert torch.equal(want["pixel_values"], got["pixel_values"])
        assert torch.equal(want["original_sizes"], got["original_sizes"])
        assert torch.equal(want["crop_top_lefts"], got["crop_top_lefts"])
        assert set(got) == {"pixel_values", "captions", "original_sizes", "crop_top_lefts"}


# ----------------------------------------------------------------------------- sources


def test_folder_with_metadata_yields_shaped_batches(tmp_path):
    texts = write_folder(tmp_path / "data", 8)
    stream = TrainStream(spec_for(train_data_dir=str(tmp_path / "data")))
    assert stream.samples_per_epoch == 8
    batches = take(stream, 2)
    batch = batches[0]
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["original_sizes"].dtype == torch.int64
    assert batch["original_sizes"].tolist() == [[10, 12]] * 4
    assert sorted(captions_of(batches)) == sorted(texts)
    # A solid colour survives the pipeline exactly: pixel = colour / 127.5 - 1.
    for pixels, caption in zip(batch["pixel_values"], batch["captions"]):
        colour = torch.tensor(colour_of(int(caption.split()[-1])), dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(pixels, colour[:, None, None].expand(3, 8, 8))
    assert stream.skipped == {}


def test_folder_with_txt_captions(tmp_path):
    texts = write_folder(tmp_path / "data", 6, captions="txt")
    stream = TrainStream(spec_for(train_data_dir=str(tmp_path / "data"), train_batch_size=3))
    assert sorted(captions_of(take(stream, 2))) == sorted(texts)


def test_folder_epoch_order_is_the_seeded_permutation(tmp_path):
    write_folder(tmp_path / "data", 8)
    stream = TrainStream(spec_for(train_data_dir=str(tmp_path / "data"), train_batch_size=8, seed=5))
    sorted_items = sorted(
        (f"sub/img{i:02d}.png" if i % 3 == 0 else f"img{i:02d}.png", f"caption {i}") for i in range(8)
    )
    order = np.random.default_rng([5, 1]).permutation(8)
    epoch_one = take(stream, 2)[1]
    assert epoch_one["captions"] == [sorted_items[i][1] for i in order]


def test_wds_brace_pattern_reads_every_shard(tmp_path):
    write_shards(tmp_path, "s", 3, 4)
    stream = TrainStream(spec_for(train_shards_path_or_url=str(tmp_path / "s-{0..2}.tar")))
    assert stream.samples_per_epoch is None
    captions = captions_of(take(stream, 3))
    assert sorted(captions) == sorted(f"s{k}_ caption {i}" for k in range(3) for i in range(4))


def test_wds_two_patterns_joined_by_double_colon(tmp_path):
    write_shards(tmp_path, "a", 2, 2)
    write_shards(tmp_path, "b", 1, 4)
    pattern = f"{tmp_path}/a-{{0..1}}.tar::{tmp_path}/b-0.tar"
    captions = captions_of(take(TrainStream(spec_for(train_shards_path_or_url=pattern)), 2))
    expected = [f"a{k}_ caption {i}" for k in range(2) for i in range(2)] + [f"b0_ caption {i}" for i in range(4)]
    assert sorted(captions) == sorted(expected)


def test_wds_pipe_shard(tmp_path):
    [path] = write_shards(tmp_path, "p", 1, 4)
    stream = TrainStream(spec_for(train_shards_path_or_url=f"pipe:cat {path}"))
    batches = take(stream, 3)  # the third batch is read by a second run of the pipe
    assert sorted(captions_of(batches[:1])) == sorted(f"p0_ caption {i}" for i in range(4))
    assert stream.epoch == 2
    assert stream.skipped == {}


# ----------------------------------------------------------------------------- splitting and determinism


def test_ranks_get_disjoint_folder_data(tmp_path):
    texts = write_folder(tmp_path / "data", 8)
    spec = spec_for(train_data_dir=str(tmp_path / "data"))
    rank_captions = [set(captions_of(take(TrainStream(spec, rank, 2), 1))) for rank in range(2)]
    assert rank_captions[0].isdisjoint(rank_captions[1])
    assert rank_captions[0] | rank_captions[1] == set(texts)


@pytest.mark.parametrize("shards", [4, 1])  # split by shard, and by sample index when shards are few
def test_ranks_get_disjoint_wds_data(tmp_path, shards):
    write_shards(tmp_path, "r", shards, 8 // shards)
    spec = spec_for(train_shards_path_or_url=str(tmp_path / f"r-{{0..{shards - 1}}}.tar"), train_batch_size=2)
    rank_captions = [captions_of(take(TrainStream(spec, rank, 2), 2)) for rank in range(2)]
    assert set(rank_captions[0]).isdisjoint(rank_captions[1])
    assert len(set(rank_captions[0] + rank_captions[1])) == 8


def test_workers_get_disjoint_data(tmp_path):
    texts = write_folder(tmp_path / "data", 8)
    spec = spec_for(train_data_dir=str(tmp_path / "data"), train_batch_size=2, dataloader_num_workers=2)
    captions = captions_of(take(TrainStream(spec), 4))
    assert sorted(captions) == sorted(texts)


def test_wds_workers_get_disjoint_data(tmp_path):
    write_shards(tmp_path, "w", 4, 2)
    spec = spec_for(train_shards_path_or_url=str(tmp_path / "w-{0..3}.tar"), train_batch_size=2,
                    dataloader_num_workers=2)
    captions = captions_of(take(TrainStream(spec), 4))
    assert len(set(captions)) == 8


def test_two_streams_are_equal_and_seeds_differ(tmp_path):
    write_shards(tmp_path, "d", 2, 6)
    spec = spec_for(train_shards_path_or_url=str(tmp_path / "d-{0..1}.tar"), random_flip=True,
                    proportion_empty_prompts=0.3)
    assert_batches_equal(take(TrainStream(spec), 6), take(TrainStream(spec), 6))
    other = spec_for(train_shards_path_or_url=str(tmp_path / "d-{0..1}.tar"), seed=1)
    assert captions_of(take(TrainStream(spec), 3)) != captions_of(take(TrainStream(other), 3))


# ----------------------------------------------------------------------------- resume


def assert_resumes_exactly(spec: DataSpec, consumed: int, following: int, rank=0, world_size=1) -> None:
    """K batches, state through JSON, a new stream: the next M batches equal the uninterrupted ones."""
    reference = TrainStream(spec, rank, world_size)
    expected = take(reference, consumed + following)
    first = TrainStream(spec, rank, world_size)
    take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches_consumed"] == consumed
    resumed = TrainStream(spec, rank, world_size)
    resumed.load_state_dict(state)
    assert_batches_equal(expected[consumed:], take(resumed, following))
    assert resumed.skipped == reference.skipped
    assert resumed.epoch == reference.epoch


def random_spec(**overrides) -> DataSpec:
    """Spec with every random transform on, so resume must replay per-sample randomness."""
    values = dict(random_flip=True, proportion_empty_prompts=0.3, train_batch_size=3)
    values.update(overrides)
    return spec_for(**values)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("consumed", [1, 5])  # 5 batches of 3 cross the boundary of 10-sample epochs
def test_folder_resume_is_exact(tmp_path, workers, consumed):
    write_folder(tmp_path / "data", 10, size=(14, 10))
    # A corrupt image makes the skip counts part of what must be restored.
    (tmp_path / "data" / "img01.png").write_bytes(b"not an image")
    spec = random_spec(train_data_dir=str(tmp_path / "data"), dataloader_num_workers=workers)
    assert_resumes_exactly(spec, consumed, 4)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("consumed", [2, 7])
def test_wds_resume_is_exact(tmp_path, workers, consumed):
    write_shards(tmp_path, "z", 4, 5)
    broken = good_samples("bad", 1)
    broken[0][1]["png"] = b"garbage"
    write_tar(tmp_path / "z-4.tar", good_samples("z4_", 2) + broken)
    spec = random_spec(train_shards_path_or_url=str(tmp_path / "z-{0..4}.tar"), dataloader_num_workers=workers)
    assert_resumes_exactly(spec, consumed, 4)


def truncated_shard(folder, name: str, count: int, cut_in: int) -> str:
    """Shard of `count` good samples cut off inside the image data of sample `cut_in`."""
    [path] = write_shards(folder, name, 1, count)
    data = open(path, "rb").read()
    with tarfile.open(path) as tar:
        cut = tar.getmember(f"{name}0_{cut_in:03d}.png").offset_data + 10
    open(path, "wb").write(data[:cut])
    return path


def test_wds_resume_with_sample_split_and_truncated_shard(tmp_path):
    path = truncated_shard(tmp_path, "t", 9, cut_in=7)
    spec = random_spec(train_shards_path_or_url=path, dataloader_num_workers=2, train_batch_size=2)
    assert_resumes_exactly(spec, 3, 5)
    assert_resumes_exactly(spec, 2, 3, rank=1, world_size=2)


def states_after_each_batch(spec: DataSpec, count: int, rank=0, world_size=1) -> tuple:
    """(stream, its first `count` batches, its state through JSON after each of them)."""
    stream = TrainStream(spec, rank, world_size)
    batches, states = [], []
    for batch in islice(iter(stream), count):
        batches.append(batch)
        states.append(json.loads(json.dumps(stream.state_dict())))
    return stream, batches, states


def assert_resumes_exactly_after(spec: DataSpec, consumed_counts, total: int, rank=0, world_size=1) -> list:
    """Resume after each of `consumed_counts` batches: the rest up to `total` equals the uninterrupted stream."""
    reference, expected, states = states_after_each_batch(spec, total, rank, world_size)
    for consumed in consumed_counts:
        resumed = TrainStream(spec, rank, world_size)
        resumed.load_state_dict(states[consumed - 1])
        assert_batches_equal(expected[consumed:], take(resumed, total - consumed))
        assert resumed.skipped == reference.skipped
        assert resumed.epoch == reference.epoch
    return states


def shard_states_of(states: list) -> list:
    """Every worker's shard state in a list of stream states."""
    return [shard_state for state in states for shard_state in state["shard_states"] if shard_state]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split", ["shard", "sample"])
def test_wds_resume_is_exact_across_shard_and_epoch_boundaries(tmp_path, workers, split):
    if split == "shard":
        # Three good shards, one cut off after 4 samples, one bad image: damage and skips must be restored.
        write_shards(tmp_path, "b", 3, 6)
        broken = good_samples("bad", 1)
        broken[0][1]["png"] = b"garbage"
        write_tar(tmp_path / "b-3.tar", good_samples("b3_", 3) + broken)
        pattern = f"{tmp_path}/b-{{0..3}}.tar::{truncated_shard(tmp_path / 'cut', 'c', 6, cut_in=4)}"
        rank, world_size, total = 0, 1, 26 // max(1, workers)
    else:
        # Three shards for four or eight readers: every reader reads every shard and keeps its turns.
        # 15 per shard, so a reader's turns fall at other offsets in each shard.
        write_shards(tmp_path, "b", 3, 15)
        pattern = str(tmp_path / "b-{0..2}.tar")
        rank, world_size, total = 1, 4, 16 // max(1, workers)
    spec = random_spec(train_shards_path_or_url=pattern, dataloader_num_workers=workers, train_batch_size=2)
    # Every batch with no workers; a spread of them with two (each resume starts two processes).
    consumed_counts = range(1, total) if workers == 0 else range(1, total, 2)
    states = assert_resumes_exactly_after(spec, consumed_counts, total, rank, world_size)
    shard_states = shard_states_of(states)
    assert len({state["epoch"] for state in states}) >= 2
    assert any(state["start"][0] < state["next"][0] for state in shard_states)  # buffer spans two shards
    assert any(state["exhausted"] for state in shard_states)  # resumed while draining at an epoch's end
    if split == "shard":
        assert states[-1]["skipped"]  # damage and a bad image were counted, so their restore was checked


@pytest.mark.parametrize("buffer_size", [0, 1])
def test_wds_resume_without_shuffle_buffer(tmp_path, buffer_size):
    # Samples pass straight through: only the input position places the reader.
    write_shards(tmp_path, "n", 3, 5)
    spec = random_spec(train_shards_path_or_url=str(tmp_path / "n-{0..2}.tar"), train_batch_size=2,
                       shuffle_buffer_size=buffer_size)
    assert_resumes_exactly_after(spec, range(1, 16), 16)


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_resume_with_max_train_samples(tmp_path, workers):
    write_shards(tmp_path, "l", 4, 6)
    spec = random_spec(train_shards_path_or_url=str(tmp_path / "l-{0..3}.tar"), dataloader_num_workers=workers,
                       train_batch_size=2, max_train_samples=10)
    total = 12
    consumed_counts = range(1, total) if workers == 0 else range(1, total, 3)
    states = assert_resumes_exactly_after(spec, consumed_counts, total)
    assert states[-1]["epoch"] >= 2


def test_wds_resume_without_shard_states_replays_the_epoch(tmp_path):
    # Checkpoints written before shard states existed still resume exactly, by the full replay.
    write_shards(tmp_path, "o", 3, 6)
    spec = random_spec(train_shards_path_or_url=str(tmp_path / "o-{0..2}.tar"), train_batch_size=2)
    _, expected, states = states_after_each_batch(spec, 10)
    old_state = {key: value for key, value in states[6].items() if key != "shard_states"}
    resumed = TrainStream(spec)
    resumed.load_state_dict(old_state)
    assert_batches_equal(expected[7:], take(resumed, 3))


def record_opened_shards(monkeypatch) -> list:
    """Urls of the shards opened from now on, in order (the main process only: use no workers)."""
    opened, open_shard = [], data_module._open_shard

    def recording_open(url):
        opened.append(url)
        return open_shard(url)

    monkeypatch.setattr(data_module, "_open_shard", recording_open)
    return opened


# Split by shard (6 shards, 1 reader) and by sample (3 shards, 4 readers); the checkpoint is late in epoch 0.
@pytest.mark.parametrize("shards, per_shard, rank, world_size, batch_size, consumed",
                         [(6, 8, 0, 1, 2, 18), (3, 16, 1, 4, 1, 9)], ids=["by_shard", "by_sample"])
def test_wds_resume_does_not_reopen_the_shards_already_used(tmp_path, monkeypatch, shards, per_shard, rank,
                                                            world_size, batch_size, consumed):
    write_shards(tmp_path, "u", shards, per_shard)
    pattern, following = str(tmp_path / f"u-{{0..{shards - 1}}}.tar"), 2
    spec = random_spec(train_shards_path_or_url=pattern, train_batch_size=batch_size, shuffle_buffer_size=2)
    expected = take(TrainStream(spec, rank, world_size), consumed + following)  # all in epoch 0
    # Built before recording: a new stream peeks at the first shard's first member (is it precomputed?), which
    # reads no sample.
    first, resumed = TrainStream(spec, rank, world_size), TrainStream(spec, rank, world_size)
    opened = record_opened_shards(monkeypatch)
    take(first, consumed)
    read_before = list(opened)
    state = json.loads(json.dumps(first.state_dict()))
    opened.clear()
    resumed.load_state_dict(state)
    assert_batches_equal(expected[consumed:], take(resumed, following))
    assert resumed.epoch == 0
    # The resume starts in the shard the checkpoint stood in; those read through before it stay closed.
    assert opened[0] == read_before[-1]
    assert not set(opened) & set(read_before[:-1])


def test_wds_resume_goes_on_when_a_needed_shard_reads_shorter(tmp_path):
    paths = write_shards(tmp_path, "g", 3, 8)
    spec = spec_for(train_shards_path_or_url=str(tmp_path / "g-{0..2}.tar"), train_batch_size=2)
    first = TrainStream(spec)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    position, index = state["shard_states"][0]["next"]
    assert index > 2
    # The shard being read when the state was saved now holds 2 samples (a re-download that broke off).
    shard = paths[np.random.default_rng([0, 0]).permutation(3)[position]]
    name = os.path.basename(shard)[:-len(".tar")].replace("-", "")
    write_tar(shard, good_samples(f"{name}_", 2))
    resumed = TrainStream(spec)
    resumed.load_state_dict(state)
    captions = captions_of(take(resumed, 3))
    assert len(captions) == 6 and resumed.skipped == {}


def test_iterating_twice_continues_the_stream(tmp_path):
    write_folder(tmp_path / "data", 6)
    spec = spec_for(train_data_dir=str(tmp_path / "data"), train_batch_size=2)
    expected = take(TrainStream(spec), 4)
    stream = TrainStream(spec)
    assert_batches_equal(expected, take(stream, 1) + take(stream, 3))


def test_load_state_rejects_changed_workers_and_keeps_saved_seed(tmp_path):
    write_folder(tmp_path / "data", 6)
    spec = spec_for(train_data_dir=str(tmp_path / "data"), train_batch_size=2, seed=3)
    first = TrainStream(spec)
    take(first, 2)
    state = first.state_dict()
    with pytest.raises(DataError, match="--dataloader_num_workers"):
        TrainStream(spec_for(train_data_dir=spec.train_data_dir, dataloader_num_workers=2)).load_state_dict(state)
    with pytest.raises(DataError, match="processes"):
        TrainStream(spec, 0, 2).load_state_dict(state)
    reseeded = TrainStream(spec_for(train_data_dir=spec.train_data_dir, train_batch_size=2, seed=99))
    reseeded.load_state_dict(state)
    assert reseeded.state_dict()["seed"] == 3
    assert_batches_equal(take(TrainStream(spec), 4)[2:], take(reseeded, 2))


# ----------------------------------------------------------------------------- bad samples


def mode_images() -> dict:
    """{name: (extension, encoded image)} in the modes that must be converted to RGB."""
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1
    encoded = {}
    for name, image, fmt in [
        ("rgba", Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"),
        ("p", palette, "PNG"),
        ("ptrans", transparent_palette, "PNG"),
        ("cmyk", Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"),
        ("l", Image.new("L", (8, 8), 60), "PNG"),
        ("la", Image.new("LA", (8, 8), (0, 0)), "PNG"),
        ("one", Image.new("1", (8, 8), 1), "PNG"),
        ("i16", Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)), "PNG"),
        ("webp", Image.new("RGB", (8, 8), (10, 20, 30)), "WEBP"),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, fmt)  # PNG writes info["transparency"] as a tRNS chunk
        encoded[name] = (fmt.lower().replace("jpeg", "jpg"), buffer.getvalue())
    return encoded


def test_bad_wds_samples_are_skipped_and_counted(tmp_path):
    truncated = noise_png()[:200]
    samples = [
        ("corrupt", {"jpg": b"\x00" * 50, "txt": b"c"}),
        ("truncated", {"png": truncated, "txt": b"c"}),
        ("empty", {"jpg": b"", "txt": b"c"}),
        ("caption_only", {"txt": b"c"}),
        ("no_caption", {"png": image_bytes()}),
        ("blank_caption", {"png": image_bytes(), "txt": b"  \n"}),
        ("bad_json", {"png": image_bytes(), "json": b"{not json"}),
        ("latin1", {"png": image_bytes(), "txt": "café".encode("latin-1")}),
        ("json_text", {"png": image_bytes(), "json": json.dumps({"text": "from json"}).encode()}),
    ] + [(f"mode_{name}", {ext: data, "txt": f"mode {name}".encode()}) for name, (ext, data) in mode_images().items()]
    path = write_tar(tmp_path / "bad.tar", samples)
    spec = spec_for(train_shards_path_or_url=path, train_batch_size=1, shuffle_buffer_size=0)
    stream = TrainStream(spec)
    batches = take(stream, 11)
    captions = captions_of(batches)
    assert captions == ["café", "from json"] + [f"mode {name}" for name in mode_images()]
    assert stream.skipped == {"bad_image": 3, "missing_image": 1, "missing_caption": 2, "bad_caption": 1,
                              "caption_reencoded": 1}
    pixels = {caption: batch["pixel_values"][0] for caption, batch in zip(captions, batches)}
    assert all(p.shape == (3, 8, 8) for p in pixels.values())
    assert torch.all(pixels["mode rgba"] == 1.0)  # transparent composited onto white
    assert torch.all(pixels["mode la"] == 1.0)
    assert torch.all(pixels["mode ptrans"] == 1.0)
    assert pixels["mode p"][:, 0, 0].tolist() == [-1.0, -1.0, 1.0]  # palette index 1 is blue
    assert torch.allclose(pixels["mode l"], torch.full((3, 8, 8), 60 / 127.5 - 1), atol=1e-6)
    assert torch.all(pixels["mode one"] == 1.0)
    # 16-bit mid-grey is scaled to 8-bit mid-grey (128), not clipped to white.
    assert torch.allclose(pixels["mode i16"], torch.full((3, 8, 8), 128 / 127.5 - 1), atol=1e-6)


def test_bad_folder_samples_are_skipped_and_counted(tmp_path):
    root = tmp_path / "data"
    write_folder(root, 6)
    (root / "img01.png").write_bytes(noise_png()[:100])
    (root / "extra.png").write_bytes(image_bytes())  # no metadata line: missing caption
    with open(root / "metadata.jsonl", "a") as file:
        file.write("{broken json\n")
    spec = spec_for(train_data_dir=str(root), train_batch_size=4, seed=2)
    stream = TrainStream(spec)
    items = sorted(["extra.png"] + [f"sub/img{i:02d}.png" if i % 3 == 0 else f"img{i:02d}.png" for i in range(6)])
    bad = {"extra.png": "missing_caption", "img01.png": "bad_image"}
    order = [items[i] for i in np.random.default_rng([2, 0]).permutation(len(items))]
    # The first batch carries the counts up to its fourth (last) good item.
    fourth_good = [position for position, item in enumerate(order) if item not in bad][3]
    expected = {"bad_metadata": 1}
    for item in order[:fourth_good]:
        if item in bad:
            expected[bad[item]] = expected.get(bad[item], 0) + 1
    assert len(captions_of(take(stream, 1))) == 4
    assert stream.skipped == dict(sorted(expected.items()))
    assert stream.samples_per_epoch == 7


def test_truncated_tar_keeps_samples_before_the_damage(tmp_path):
    path = truncated_shard(tmp_path, "cut", 3, cut_in=2)
    not_a_tar = tmp_path / "junk.tar"
    not_a_tar.write_bytes(b"this is not a tar archive" * 40)
    pattern = f"{path}::{not_a_tar}"
    spec = spec_for(train_shards_path_or_url=pattern, train_batch_size=1, shuffle_buffer_size=0)
    stream = TrainStream(spec)
    captions = captions_of(take(stream, 4))
    assert sorted(captions[:2]) == ["cut0_ caption 0", "cut0_ caption 1"]
    assert stream.skipped["truncated_shard"] >= 2  # the cut shard and the junk one, in epoch 0
    assert set(stream.skipped) == {"truncated_shard"}


def test_shard_damage_is_counted_once_across_readers(tmp_path):
    # Both workers read the one shard (too few shards to split); only one may count its damage.
    path = truncated_shard(tmp_path, "once", 9, cut_in=7)
    spec = spec_for(train_shards_path_or_url=path, dataloader_num_workers=2, train_batch_size=1,
                    shuffle_buffer_size=0)
    stream = TrainStream(spec)
    take(stream, 10)  # each worker has finished epoch 0 and started epoch 1
    assert stream.skipped == {"truncated_shard": 1}


def test_pickle_members_are_never_decoded(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a tar member was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    payload = pickle.dumps({"weights": 1})
    samples = [
        ("a", {"png": image_bytes(), "txt": b"kept", "pth": payload, "pyd": payload, "pickle": payload}),
        ("b", {"pth": payload}),
        ("c", {"png": image_bytes(), "txt": b"also kept"}),
    ]
    path = write_tar(tmp_path / "pickles.tar", samples)
    stream = TrainStream(spec_for(train_shards_path_or_url=path, train_batch_size=2, shuffle_buffer_size=0))
    assert captions_of(take(stream, 1)) == ["kept", "also kept"]
    assert stream.skipped == {"missing_image": 1}


def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 8x8 = 64 only warns; 16x16 = 256 > 2 x 40 errors
    samples = [("bomb", {"png": image_bytes((16, 16)), "txt": b"bomb"}),
               ("fine", {"png": image_bytes((8, 8)), "txt": b"fine"})]
    path = write_tar(tmp_path / "bomb.tar", samples)
    stream = TrainStream(spec_for(train_shards_path_or_url=path, train_batch_size=1, shuffle_buffer_size=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert captions_of(take(stream, 1)) == ["fine"]
    assert stream.skipped == {"bad_image": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_dataset_raises_quickly(tmp_path, workers):
    root = tmp_path / "data"
    write_folder(root, 4)
    for name in ["sub/img00.png", "img01.png", "img02.png", "sub/img03.png"]:
        (root / name).write_bytes(b"broken")
    stream = TrainStream(spec_for(train_data_dir=str(root), dataloader_num_workers=workers, train_batch_size=1))
    started = time.monotonic()
    with pytest.raises(DataError, match="no usable samples") as error:
        take(stream, 1)
    assert time.monotonic() - started < 10
    assert f"bad_image: {4 // max(1, workers)}" in str(error.value)
    assert "\n" not in str(error.value)


def test_all_bad_shards_raise(tmp_path):
    samples = [("x", {"txt": b"no image"}), ("y", {"png": b"junk", "txt": b"bad"})]
    path = write_tar(tmp_path / "bad.tar", samples)
    with pytest.raises(DataError, match="no usable samples.*missing_image: 1"):
        take(TrainStream(spec_for(train_shards_path_or_url=path)), 1)


def test_too_few_samples_for_the_readers_raises(tmp_path):
    path = write_tar(tmp_path / "one.tar", good_samples("o", 1))
    with pytest.raises(DataError, match="fewer samples/shards than the 2 readers"):
        take(TrainStream(spec_for(train_shards_path_or_url=path, train_batch_size=1), rank=1, world_size=2), 1)
    write_folder(tmp_path / "data", 1)
    spec = spec_for(train_data_dir=str(tmp_path / "data"), train_batch_size=1, dataloader_num_workers=2)
    with pytest.raises(DataError, match="--train_data_dir .*fewer samples/shards than the 2 readers"):
        take(TrainStream(spec), 3)


# ----------------------------------------------------------------------------- transforms


def striped_image() -> bytes:
    """8 high x 16 wide: red left quarter, blue middle half, green right quarter."""
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, :4] = (255, 0, 0)
    pixels[:, 4:12] = (0, 0, 255)
    pixels[:, 12:] = (0, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_center_crop_takes_the_center(tmp_path):
    path = write_tar(tmp_path / "c.tar", [(f"k{i}", {"png": striped_image(), "txt": b"c"}) for i in range(4)])
    batch = take(TrainStream(spec_for(train_shards_path_or_url=path, center_crop=True)), 1)[0]
    assert batch["crop_top_lefts"].tolist() == [[0, 4]] * 4
    assert batch["original_sizes"].tolist() == [[8, 16]] * 4
    blue = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]
    assert torch.all(batch["pixel_values"] == blue)


def test_random_crop_varies_and_stays_inside(tmp_path):
    path = write_tar(tmp_path / "r.tar", [(f"k{i}", {"png": striped_image(), "txt": b"c"}) for i in range(16)])
    batch = take(TrainStream(spec_for(train_shards_path_or_url=path, train_batch_size=16)), 1)[0]
    lefts = batch["crop_top_lefts"][:, 1]
    assert batch["crop_top_lefts"][:, 0].eq(0).all()
    assert lefts.min() >= 0 and lefts.max() <= 8 and len(set(lefts.tolist())) > 1


def test_downscaled_resize_records_sizes(tmp_path):
    samples = [("big", {"png": image_bytes((32, 16)), "txt": b"big"}),
               ("small", {"png": image_bytes((4, 6)), "txt": b"small"})]
    path = write_tar(tmp_path / "s.tar", samples)
    batch = take(TrainStream(spec_for(train_shards_path_or_url=path, train_batch_size=2, center_crop=True,
                                      shuffle_buffer_size=0, interpolation_type="bicubic")), 1)[0]
    assert batch["original_sizes"].tolist() == [[16, 32], [6, 4]]
    assert batch["crop_top_lefts"].tolist() == [[0, 4], [2, 0]]  # resized to 16x8 and 8x12
    assert batch["pixel_values"].shape == (2, 3, 8, 8)


def test_random_flip_flips_some_samples(tmp_path):
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, 4:] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    path = write_tar(tmp_path / "f.tar", [(f"k{i}", {"png": buffer.getvalue(), "txt": b"f"}) for i in range(16)])
    batch = take(TrainStream(spec_for(train_shards_path_or_url=path, train_batch_size=16, random_flip=True)), 1)[0]
    left_column = batch["pixel_values"][:, 0, 0, 0]
    assert (left_column == -1).any() and (left_column == 1).any()
    unflipped = take(TrainStream(spec_for(train_shards_path_or_url=path, train_batch_size=16)), 1)[0]
    assert torch.all(unflipped["pixel_values"][:, 0, 0, 0] == -1)


@pytest.mark.parametrize("proportion, expected_empty", [(1.0, 8), (0.0, 0)])
def test_proportion_empty_prompts(tmp_path, proportion, expected_empty):
    write_folder(tmp_path / "data", 8)
    spec = spec_for(train_data_dir=str(tmp_path / "data"), proportion_empty_prompts=proportion)
    captions = captions_of(take(TrainStream(spec), 2))
    assert captions.count("") == expected_empty


def test_max_train_samples_limits_folder_epoch(tmp_path):
    write_folder(tmp_path / "data", 10)
    spec = spec_for(train_data_dir=str(tmp_path / "data"), max_train_samples=4, train_batch_size=2)
    stream = TrainStream(spec)
    assert stream.samples_per_epoch == 4
    captions = captions_of(take(stream, 6))
    # The first four of the sorted list: img01, img02, img04, img05 (sub/ sorts after them).
    assert set(captions) == {"caption 1", "caption 2", "caption 4", "caption 5"}
    assert stream.epoch == 2


def test_max_train_samples_sets_wds_epoch_length(tmp_path):
    write_shards(tmp_path, "m", 1, 8)
    spec = spec_for(train_shards_path_or_url=str(tmp_path / "m-0.tar"), max_train_samples=3, train_batch_size=1)
    stream = TrainStream(spec)
    assert stream.samples_per_epoch == 3
    take(stream, 3)
    assert stream.epoch == 0
    take(stream, 1)
    assert stream.epoch == 1
    assert stream.state_dict()["positions"] == [[1, 1]]


# ----------------------------------------------------------------------------- check_data_spec


def test_check_data_spec_errors_name_the_flag(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    cases = [
        (DataSpec(train_data_dir=str(tmp_path / "missing")), "--train_data_dir: folder .* does not exist"),
        (DataSpec(train_data_dir=str(tmp_path / "empty")), "--train_data_dir: folder .* holds no images"),
        (DataSpec(train_shards_path_or_url=str(tmp_path / "x-{0..2}.tar")), "--train_shards_path_or_url: shard"),
        (DataSpec(train_shards_path_or_url="a.tar", train_data_dir=str(tmp_path)), "both set"),
        (DataSpec(), "--train_shards_path_or_url .*--train_data_dir"),
        (DataSpec(train_data_dir=str(tmp_path), resolution=0), "--resolution"),
        (DataSpec(train_data_dir=str(tmp_path), train_batch_size=0), "--train_batch_size"),
        (DataSpec(train_data_dir=str(tmp_path), dataloader_num_workers=-1), "--dataloader_num_workers"),
        (DataSpec(train_data_dir=str(tmp_path), proportion_empty_prompts=1.5), "--proportion_empty_prompts"),
        (DataSpec(train_data_dir=str(tmp_path), max_train_samples=0), "--max_train_samples"),
        (DataSpec(train_data_dir=str(tmp_path), interpolation_type="cubic"), "--interpolation_type"),
    ]
    for spec, message in cases:
        with pytest.raises(DataError, match=message):
            check_data_spec(spec)


def test_check_data_spec_accepts_valid_sources(tmp_path):
    write_shards(tmp_path, "v", 2, 1)
    check_data_spec(DataSpec(train_shards_path_or_url=str(tmp_path / "v-{0..1}.tar")))
    check_data_spec(DataSpec(train_shards_path_or_url="pipe:curl -s http://example.invalid/{0..9}.tar"))
    check_data_spec(DataSpec(train_shards_path_or_url="https://example.invalid/{0..9}.tar"))
    write_folder(tmp_path / "images", 1)
    check_data_spec(DataSpec(train_data_dir=str(tmp_path / "images"), interpolation_type="lanczos"))
