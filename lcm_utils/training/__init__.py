"""The training both scripts share: the script interface, setup, the loop, checkpoints, validation and export.

What differs between full distillation and LCM-LoRA lives in a `DistillationMethod` subclass in each script.
"""

from .cli import build_parser, main
from .export import pretrained_parts, sampler_usage, stock_pipeline, vae_import, write_model_card
from .method import DistillationMethod
from .validation import log_grid

__all__ = ["build_parser", "main", "pretrained_parts", "sampler_usage", "stock_pipeline", "vae_import",
           "write_model_card", "DistillationMethod", "log_grid"]
