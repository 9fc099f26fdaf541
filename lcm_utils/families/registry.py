"""Which family a teacher is: read from its folder's configs (no weights), one table for every check."""

import os
import warnings

from ..errors import ConfigError
from .sd import StableDiffusion
from .sdxl import StableDiffusionXL

FAMILIES = {None: StableDiffusion, "text_time": StableDiffusionXL}  # by the UNet's addition_embed_type


def family_of(denoiser_config, source="the teacher's unet/config.json"):
    """The family class for a denoiser config (dict); ConfigError for one no family here takes."""
    kind = denoiser_config.get("addition_embed_type")
    if kind not in FAMILIES:
        known = ", ".join(repr(k) for k in FAMILIES if k) + " or none"
        raise ConfigError(f"--pretrained_teacher_model: {source} has addition_embed_type {kind!r}; this trainer "
                          f"takes SD 1.x/2.x and SDXL-family UNets ({known})")
    return FAMILIES[kind]


def teacher_revision(args):
    return args.teacher_revision or args.revision


def pretrained_source(args):
    """from_pretrained's source arguments of the teacher's parts: its Hub revision and cache."""
    return dict(revision=teacher_revision(args), cache_dir=args.cache_dir)


def denoiser_config(path, src=None):
    """The denoiser config (dict) of a teacher folder or Hub id; no weights are read."""
    # Every family here keeps its denoiser in unet/: the base family's reader takes any of their configs.
    return StableDiffusion.denoiser_class().load_config(path, subfolder=StableDiffusion.denoiser_folder,
                                                        **(src or {}))


def family_at(path, src=None):
    """The family class of a teacher folder or Hub id, from its denoiser config alone."""
    return family_of(denoiser_config(path, src))


def teacher_family(args):
    """The teacher's family class, from its denoiser config alone (no weights); for a Hub id this is the first thing
    fetched, so a wrong id or path fails here, in one line, before anything heavy."""
    name = args.pretrained_teacher_model
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notes about its own arguments
            warnings.simplefilter("ignore", UserWarning)
            config = denoiser_config(name, pretrained_source(args))
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--pretrained_teacher_model: '{name}' is not a folder here ({os.getcwd()}) and could not "
                          f"be loaded as a Hub model ({reason}); pass the teacher folder's path or a Hub id") from None
    return family_of(config)
