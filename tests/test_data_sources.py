"""Sample metadata (original sizes, LAION filters) and the Hugging Face datasets source of the data stream."""

import json
import os

import pytest
import torch

from lcm_utils.data import DataError, TrainStream, check_data_spec
from test_data import (assert_resumes_exactly, captions_of, colour_of, image_bytes, random_spec, spec_for, take,
                       write_tar)


def laion_samples(metas, size=(12, 10)):
    """Samples with image, txt caption and the given json metadata (dicts, or raw bytes for broken json)."""
    return [(f"s{i:03d}", {"png": image_bytes(size, colour_of(i)), "txt": f"caption {i}".encode(),
                           "json": meta if isinstance(meta, bytes) else json.dumps(meta).encode()})
            for i, meta in enumerate(metas)]


def test_original_size_from_metadata_and_bad_sizes_are_skipped(tmp_path):
    metas = [
        {"original_height": 900, "original_width": 1600, "height": 10, "width": 12},  # original_* wins
        {"height": 480, "width": 640},
        {},  # no size: the image's own (10 x 12)
        {"original_height": "720", "original_width": 1280.0},  # numeric string and float are numbers
        {"original_height": "tall", "original_width": 640},
        {"original_height": 480},  # half a size
        {"height": -3, "width": 640},
        {"height": 1e20, "width": 640},  # would overflow the batch's int64 tensor
        {"original_height": 0.4, "original_width": 640},  # rounds to 0
        b"{broken json",  # the caption comes from .txt; no metadata
    ]
    path = write_tar(tmp_path / "meta.tar", laion_samples(metas))
    stream = TrainStream(spec_for(train_shards_path_or_url=path, train_batch_size=1, shuffle_buffer_size=0))
    batches = take(stream, 5)
    assert captions_of(batches) == ["caption 0", "caption 1", "caption 2", "caption 3", "caption 9"]
    assert [b["original_sizes"][0].tolist() for b in batches] == [[900, 1600], [480, 640], [10, 12], [720, 1280],
                                                                   [10, 12]]
    assert stream.skipped == {"bad_size_metadata": 5}
    # An SD teacher has no time ids: size metadata is not read, so nothing is skipped for it.
    sd_stream = TrainStream(spec_for(train_shards_path_or_url=path, train_batch_size=1, shuffle_buffer_size=0,
                                     use_size_metadata=False))
    sd_batches = take(sd_stream, 10)
    assert captions_of(sd_batches) == [f"caption {i}" for i in range(10)] and not sd_stream.skipped
    assert all(b["original_sizes"][0].tolist() == [10, 12] for b in sd_batches)


def test_laion_filters_reject_and_count_and_missing_fields_pass(tmp_path):
    metas = [
        {"original_height": 800, "original_width": 900, "pwatermark": 0.1, "aesthetic": 6.0},  # passes all
        {"original_height": 800, "original_width": 600, "pwatermark": 0.1, "aesthetic": 6.0},  # too small
        {"original_height": 800, "original_width": 900, "pwatermark": 0.9, "aesthetic": 6.0},  # watermark
        {"original_height": 800, "original_width": 900, "pwatermark": 0.5, "aesthetic": 4.0},  # not aesthetic
        {"original_height": 700, "original_width": 700},  # at the limits; no scores: passes
        {"pwatermark": None, "aesthetic": "n/a"},  # image size 10 x 12 < 700; a non-number score
        {"original_height": 800, "original_width": 900, "pwatermark": 0.5, "aesthetic": 5.0},  # limits: passes
    ]
    path = write_tar(tmp_path / "laion.tar", laion_samples(metas))
    spec = spec_for(train_shards_path_or_url=path, train_batch_size=1, shuffle_buffer_size=0, min_original_size=700,
                    max_watermark_probability=0.5, min_aesthetic_score=5.0)
    stream = TrainStream(spec)
    assert captions_of(take(stream, 3)) == ["caption 0", "caption 4", "caption 6"]
    assert stream.skipped == {"filtered_min_original_size": 1, "filtered_max_watermark_probability": 1,
                              "filtered_min_aesthetic_score": 1, "bad_metadata": 1}
    # Without metadata the image's own size is the original size, so the size filter still applies.
    only_size = spec_for(train_shards_path_or_url=path, train_batch_size=1, shuffle_buffer_size=0,
                         min_original_size=11)
    with pytest.raises(DataError, match="loosen or unset --min_original_size"):
        take(TrainStream(spec_for(train_data_dir=str(write_plain_folder(tmp_path / "plain")),
                                  min_original_size=11)), 1)
    stream = TrainStream(only_size)
    assert captions_of(take(stream, 6)) == [f"caption {i}" for i in (0, 1, 2, 3, 4, 6)]  # 5's image is 10 x 12
    assert stream.skipped == {"filtered_min_original_size": 1}


def write_plain_folder(root, count=3):
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        (root / f"{i}.png").write_bytes(image_bytes((12, 10), colour_of(i)))
        (root / f"{i}.txt").write_text(f"caption {i}")
    return root


@pytest.mark.parametrize("flags, message", [
    (dict(min_original_size=0), "--min_original_size must be > 0"),
    (dict(max_watermark_probability=1.5), "--max_watermark_probability must be in [0, 1]"),
])
def test_filter_flag_ranges(tmp_path, flags, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_data_spec(spec_for(train_data_dir=str(write_plain_folder(tmp_path / "d")), **flags))


# ----------------------------------------------------------------------------- datasets


def save_dataset(folder, count=10, captions=None, **columns):
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (14, 10), colour_of(i)) for i in range(count)]
    rows = {"image": images, "text": captions or [f"caption {i}" for i in range(count)], **columns}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(folder))
    return str(folder)


def test_dataset_source_yields_rows_with_metadata_and_skips_bad_ones(tmp_path):
    import datasets

    folder = save_dataset(tmp_path / "ds", count=4, captions=[["a"], ["b1", "b2", " "], [""], ["d"]],
                          original_height=[100, 200, 300, 400], original_width=[150, 250, 350, 450])
    # One unreadable image: stored as bytes that are no image.
    loaded = datasets.load_from_disk(folder).cast_column("image", datasets.Image(decode=False))
    broken = loaded.map(lambda row, i: {"image": {"bytes": b"junk", "path": None} if i == 3 else row["image"]},
                        with_indices=True)
    broken.save_to_disk(str(tmp_path / "broken"))
    stream = TrainStream(spec_for(dataset_name=str(tmp_path / "broken"), train_batch_size=1))
    batches = take(stream, 6)  # 2 usable rows an epoch
    captions = captions_of(batches)
    assert set(captions) <= {"a", "b1", "b2"} and {"a"} < set(captions)
    sizes = {c: b["original_sizes"][0].tolist() for c, b in zip(captions, batches)}
    assert sizes["a"] == [100, 150]
    # Two full epochs read through (the third stops at its last usable row): each bad row counted per visit.
    assert set(stream.skipped) == {"missing_caption", "bad_image"} and min(stream.skipped.values()) >= 2


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_resume_is_exact(tmp_path, workers):
    folder = save_dataset(tmp_path / "ds", count=10)
    spec = random_spec(dataset_name=folder, dataloader_num_workers=workers)
    assert_resumes_exactly(spec, 4, 4)
    assert_resumes_exactly(spec, 1, 3, rank=1, world_size=2)


def test_max_train_samples_on_a_dataset_is_diffusers_seeded_subset(tmp_path):
    """--max_train_samples takes the rows diffusers' datasets scripts take (shuffle(seed).select(range(N))), and
    the subset follows the stream's seed, which a resumed run takes from its checkpoint."""
    import datasets

    folder = save_dataset(tmp_path / "ds", count=12)
    for seed in (0, 7):
        expected = datasets.load_from_disk(folder).shuffle(seed=seed).select(range(5))["text"]
        stream = TrainStream(spec_for(dataset_name=folder, max_train_samples=5, train_batch_size=5, seed=seed))
        assert sorted(captions_of(take(stream, 1))) == sorted(expected)
    assert sorted(expected) != [f"caption {i}" for i in range(5)]  # not the first rows


def test_a_dataset_that_changed_since_the_checkpoint_is_refused(tmp_path):
    folder = save_dataset(tmp_path / "ds", count=6)
    spec = spec_for(dataset_name=folder, train_batch_size=2)
    stream = TrainStream(spec)
    take(stream, 2)
    state = stream.state_dict()
    assert state["source"]["rows"] == 6
    same = TrainStream(spec)
    same.load_state_dict(state)  # the same data reloaded: same fingerprint
    save_dataset(tmp_path / "ds2", count=6, captions=[f"other {i}" for i in range(6)])
    os.rename(folder, tmp_path / "old")
    os.rename(tmp_path / "ds2", folder)
    with pytest.raises(DataError, match=r"--dataset_name '.*ds' changed since the checkpoint was written \(6 rows"):
        TrainStream(spec).load_state_dict(state)
    with pytest.raises(DataError, match="changed since the checkpoint"):
        TrainStream(spec).load_elastic([state])


def test_dataset_in_a_plain_folder_loads_with_load_dataset(tmp_path):
    """A folder of images + metadata.jsonl given as --dataset_name goes through datasets' imagefolder builder."""
    root = tmp_path / "imagefolder"
    root.mkdir()
    lines = []
    for i in range(4):
        (root / f"{i}.png").write_bytes(image_bytes((12, 10), colour_of(i)))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"caption {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    spec = spec_for(dataset_name=str(root), cache_dir=str(tmp_path / "cache"), train_batch_size=4)
    stream = TrainStream(spec)
    batch = take(stream, 1)[0]
    assert sorted(batch["captions"]) == [f"caption {i}" for i in range(4)]
    TrainStream(spec).load_state_dict(stream.state_dict())  # reloaded from its files: the same fingerprint
    assert batch["pixel_values"].shape == (4, 3, 8, 8)


def test_dataset_errors_name_the_flag(tmp_path, monkeypatch):
    folder = save_dataset(tmp_path / "ds", count=2)
    with pytest.raises(DataError, match="--image_column: 'picture' is not a column of --dataset_name"):
        TrainStream(spec_for(dataset_name=folder, image_column="picture"))
    with pytest.raises(DataError, match="--caption_column: 'caption' is not a column"):
        TrainStream(spec_for(dataset_name=folder, caption_column="caption"))
    with pytest.raises(DataError, match="--dataset_name: './no/such/dataset' does not exist"):
        check_data_spec(spec_for(dataset_name="./no/such/dataset"))
    with pytest.raises(DataError, match="--dataset_name: cannot load 'someone/not-here'"):
        TrainStream(spec_for(dataset_name="someone/not-here", cache_dir=str(tmp_path / "cache")))
    with pytest.raises(DataError, match="are both set"):
        check_data_spec(spec_for(dataset_name=folder, train_data_dir=str(tmp_path)))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(DataError, match="--dataset_name needs the 'datasets' package: pip install datasets"):
        check_data_spec(spec_for(dataset_name=folder))


def test_dataset_pixels_match_the_folder_pipeline(tmp_path):
    """The same images through a dataset and through an image folder give the same pixels (one decoder)."""
    folder = save_dataset(tmp_path / "ds", count=3)
    batch = take(TrainStream(spec_for(dataset_name=folder, train_batch_size=3, center_crop=True)), 1)[0]
    for caption, pixels in zip(batch["captions"], batch["pixel_values"]):
        i = int(caption.split()[-1])
        expected = torch.tensor(colour_of(i), dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(pixels[:, 4, 4], expected, atol=1e-6)
