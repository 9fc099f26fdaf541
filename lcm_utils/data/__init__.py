"""The training data: a deterministic, resumable stream of (image, caption) batches, or of precomputed latents and
text embeddings, from webdataset shards, an image folder or a Hugging Face dataset.

`spec.py` holds the flags, `samples.py` one sample's decoding and transform, `shards.py` the tar reader and
shuffle buffer, `sources/` the sources behind one base class and one table, `stream.py` the per-process stream.
This package imports only lcm_utils.errors and lcm_utils.tensors: it knows no model.
"""

from ..errors import DataError, ReaderError
from .samples import (INTERPOLATIONS, SKIP_REASONS, SampleRules, SkipSample, Transform, decode_image,
                      sample_rng)
from .shards import SHARD_DAMAGED, expand_shard_urls, read_shard
from .sources import SOURCES, build_source, check_data_spec, data_location, given_sources
from .sources.latents import latents_from_posterior
from .spec import DataSpec, readers_per_rank
from .stream import TrainStream, data_report, format_counts, tracker_name

__all__ = ["DataError", "ReaderError", "INTERPOLATIONS", "SKIP_REASONS", "SampleRules", "SkipSample", "Transform",
           "decode_image", "sample_rng", "SHARD_DAMAGED", "expand_shard_urls", "read_shard", "SOURCES",
           "build_source", "check_data_spec", "data_location", "given_sources", "latents_from_posterior",
           "DataSpec", "readers_per_rank", "TrainStream", "data_report", "format_counts",
           "tracker_name"]
