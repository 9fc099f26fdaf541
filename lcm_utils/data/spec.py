"""The data flags as one object (`DataSpec`, named as diffusers' flags), and their range checks."""

from dataclasses import dataclass, fields
from typing import Optional

from ..errors import DataError
from .samples import INTERPOLATIONS


@dataclass
class DataSpec:
    """Where the training pairs come from and how they are shaped; names follow the diffusers flags."""

    train_shards_path_or_url: Optional[str] = None
    train_data_dir: Optional[str] = None
    resolution: int = 512
    interpolation_type: str = "bilinear"
    center_crop: bool = False
    random_flip: bool = False
    proportion_empty_prompts: float = 0.0
    max_train_samples: Optional[int] = None
    train_batch_size: int = 16
    dataloader_num_workers: int = 0
    shuffle_buffer_size: int = 1000
    image_column: Optional[str] = None  # folder: metadata.jsonl key (file_name); dataset: column (image)
    caption_column: str = "text"
    seed: int = 0
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    cache_dir: Optional[str] = None
    min_original_size: Optional[int] = None
    max_watermark_probability: Optional[float] = None
    min_aesthetic_score: Optional[float] = None
    use_size_metadata: bool = True  # read original sizes from metadata (SDXL's time ids); SD does not need them

    @classmethod
    def from_flags(cls, args, seed: int, use_size_metadata: bool = True) -> "DataSpec":
        """The spec of parsed flags (the fields are named as the flags); flags a command does not take
        (lcm_utils.precompute has no shuffling or prompt dropping) keep the defaults."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**dict(values, seed=seed, use_size_metadata=use_size_metadata))


def readers_per_rank(spec: DataSpec) -> int:
    """Logical readers per process: the main process counts as one when there are no workers."""
    return max(1, spec.dataloader_num_workers)


def check_numbers(spec: DataSpec) -> None:
    """Range checks of the numeric flags and the interpolation name."""
    if spec.resolution <= 0:
        raise DataError(f"--resolution must be > 0, got {spec.resolution}")
    if spec.train_batch_size <= 0:
        raise DataError(f"--train_batch_size must be > 0, got {spec.train_batch_size}")
    if spec.dataloader_num_workers < 0:
        raise DataError(f"--dataloader_num_workers must be >= 0, got {spec.dataloader_num_workers}")
    if not 0.0 <= spec.proportion_empty_prompts <= 1.0:
        raise DataError(f"--proportion_empty_prompts must be in [0, 1], got {spec.proportion_empty_prompts}")
    if spec.max_train_samples is not None and spec.max_train_samples <= 0:
        raise DataError(f"--max_train_samples must be > 0 or unset, got {spec.max_train_samples}")
    if spec.shuffle_buffer_size < 0:
        raise DataError(f"--shuffle_buffer_size must be >= 0, got {spec.shuffle_buffer_size}")
    if spec.min_original_size is not None and spec.min_original_size <= 0:
        raise DataError(f"--min_original_size must be > 0 or unset, got {spec.min_original_size}")
    if spec.max_watermark_probability is not None and not 0.0 <= spec.max_watermark_probability <= 1.0:
        raise DataError(f"--max_watermark_probability must be in [0, 1] or unset, got {spec.max_watermark_probability}")
    if spec.interpolation_type.lower() not in INTERPOLATIONS:
        names = "|".join(INTERPOLATIONS)
        raise DataError(f"--interpolation_type: unknown filter '{spec.interpolation_type}'; use one of {names}")
