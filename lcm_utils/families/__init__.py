"""Model families: everything that differs between SD 1.x/2.x and SDXL teachers, as one class each.

A family checks and loads the teacher's denoiser and noise schedule, turns captions into denoiser conditions
(text encoders, pooled embeddings, added time ids), names the LoRA target modules and weight files, and builds
the stock pipeline that validation, evaluation and export use. Shared code asks the family, never which it is.
"""

from .registry import (FAMILIES, family_at, family_of, local_denoiser_folder, pretrained_source, teacher_family,
                       teacher_identity, teacher_revision)
from .sd import StableDiffusion, read_json
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL, time_ids
from .teacher import (Teacher, encode_images, load_encoders, load_teacher, load_teacher_denoiser, pipeline_settings,
                      vae_scale_factor)

__all__ = ["FAMILIES", "family_at", "family_of", "local_denoiser_folder", "pretrained_source", "teacher_family",
           "teacher_identity", "teacher_revision", "StableDiffusion", "read_json", "StableDiffusion3",
           "StableDiffusionXL", "time_ids", "Teacher", "encode_images", "load_encoders", "load_teacher",
           "load_teacher_denoiser", "pipeline_settings", "vae_scale_factor"]
