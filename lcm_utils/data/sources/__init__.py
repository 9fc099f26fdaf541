"""The data sources behind one base class, and the one table that checking, building the stream and precompute
read: which flag selects which source."""

from ...errors import DataError
from ..spec import check_numbers
from .base import IndexableSource, Source
from .folder import FolderSource
from .hf_dataset import DatasetSource
from .latents import LatentShardSource
from .webdataset import ShardSource

SOURCES = (ShardSource, FolderSource, DatasetSource)  # in the order the messages name their flags


def given_sources(spec_or_args):
    """The source classes whose flag is set (one, once the spec is checked)."""
    return [source for source in SOURCES if getattr(spec_or_args, source.field, None)]


def data_location(spec_or_args):
    """The value of the one data flag that is set (a folder, a shard pattern, a dataset name)."""
    return getattr(spec_or_args, given_sources(spec_or_args)[0].field)


def check_data_spec(spec) -> None:
    """Cheap validation before any heavy loading; raises DataError naming the flag and the fix."""
    sources = given_sources(spec)
    given = [source.flag for source in sources]
    if len(given) > 1:
        raise DataError(f"{' and '.join(given)} are {'both' if len(given) == 2 else 'all'} set; pass only one "
                        f"data source")
    if not given:
        choices = [f"{source.flag} ({source.kind})" for source in SOURCES]
        raise DataError(f"no training data: pass {', '.join(choices[:-1])} or {choices[-1]}")
    check_numbers(spec)
    sources[0].check(spec)


def build_source(spec, rank: int = 0) -> Source:
    """The source the spec names (shards written by lcm_utils.precompute become a latent source)."""
    return given_sources(spec)[0].build(spec, rank)


__all__ = ["SOURCES", "given_sources", "data_location", "check_data_spec", "build_source", "Source",
           "IndexableSource", "FolderSource", "DatasetSource", "ShardSource", "LatentShardSource"]
