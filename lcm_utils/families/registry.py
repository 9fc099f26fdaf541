"""Which family a teacher is: read from its folder's configs (no weights), one table for every check."""

import os
import warnings

from ..errors import ConfigError
from ..fingerprints import config_fingerprint, weights_fingerprint
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

UNET_FAMILIES = {None: StableDiffusion, "text_time": StableDiffusionXL}  # by the UNet's addition_embed_type
FAMILIES = (StableDiffusion, StableDiffusionXL, StableDiffusion3)
DENOISER_FOLDERS = tuple(dict.fromkeys(family.denoiser_folder for family in FAMILIES))  # unet, transformer


def family_of(denoiser_config, source="the teacher's denoiser config", flag="--pretrained_teacher_model"):
    """The family class for a denoiser config (dict); ConfigError for one no family here takes."""
    if StableDiffusion3.matches(denoiser_config):
        return StableDiffusion3
    name = denoiser_config.get("_class_name", "UNet2DConditionModel")
    if name != StableDiffusion.denoiser_class_name:
        raise ConfigError(f"{flag}: {source} is a {name}; this trainer takes SD 1.x/2.x and SDXL UNets and SD3 "
                          f"transformers")
    kind = denoiser_config.get("addition_embed_type")
    if kind not in UNET_FAMILIES:
        known = ", ".join(repr(k) for k in UNET_FAMILIES if k) + " or none"
        raise ConfigError(f"{flag}: {source} has addition_embed_type {kind!r}; this trainer "
                          f"takes SD 1.x/2.x and SDXL-family UNets ({known})")
    return UNET_FAMILIES[kind]


def local_denoiser_folder(path):
    """The denoiser subfolder (unet/ or transformer/) of a local teacher folder, or None without either."""
    for folder in DENOISER_FOLDERS:
        if os.path.isfile(os.path.join(path, folder, "config.json")):
            return folder
    return None


def teacher_revision(args):
    return args.teacher_revision or args.revision


def pretrained_source(args):
    """from_pretrained's source arguments of the teacher's parts: its Hub revision and cache."""
    return dict(revision=teacher_revision(args), cache_dir=args.cache_dir)


def denoiser_config(path, src=None):
    """The denoiser config (dict) of a teacher folder or Hub id, from unet/ or transformer/; no weights are read."""
    folders = DENOISER_FOLDERS
    if os.path.isdir(path):
        folders = (local_denoiser_folder(path) or folders[0],)
    error = None
    for folder in folders:
        try:
            # Any denoiser class reads any config.json: the file, not the class, says which family it is.
            return dict(StableDiffusion.denoiser_class().load_config(path, subfolder=folder, **(src or {})))
        except (OSError, ValueError) as e:
            error = error or e
    raise error


def family_at(path, src=None):
    """The family class of a teacher folder or Hub id, from its denoiser config alone."""
    return family_of(denoiser_config(path, src))


_HUB_REACHABLE = {}  # endpoint -> bool, probed once per process


def hub_reachable():
    """Whether a TCP connection to the Hub endpoint opens within 3 s; True when offline mode is set (the cache is
    used) or a proxy is configured (a direct probe would say nothing about it)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in proxies):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    key = (endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80))
    if key not in _HUB_REACHABLE:
        try:
            socket.create_connection(key, timeout=3).close()
            _HUB_REACHABLE[key] = True
        except OSError:
            _HUB_REACHABLE[key] = False
    return _HUB_REACHABLE[key]


def check_hub(name, flag):
    """One line, in seconds instead of 30 s of retries ending in 'no config.json', when a Hub id is given and the
    Hub cannot be reached."""
    if os.path.isdir(name) or hub_reachable():
        return
    from huggingface_hub import constants

    raise ConfigError(f"{flag}: '{name}' is a Hub id and the Hub ({constants.ENDPOINT}) cannot be reached from here; "
                      f"download it where there is network (hf download {name} --local-dir DIR) and pass DIR, or set "
                      f"HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache")


def teacher_family(args):
    """The teacher's family class, from its denoiser config alone (no weights); for a Hub id this is the first thing
    fetched, so a wrong id or path fails here, in one line, before anything heavy."""
    name = args.pretrained_teacher_model
    check_hub(name, "--pretrained_teacher_model")
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notes about its own arguments
            warnings.simplefilter("ignore", UserWarning)
            config = denoiser_config(name, pretrained_source(args))
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--pretrained_teacher_model: '{name}' is not a folder here ({os.getcwd()}) and could not "
                          f"be loaded as a Hub model ({reason}); pass the teacher folder's path or a Hub id") from None
    return family_of(config)


def teacher_identity(args):
    """What a checkpoint records of the teacher it trains against: family, denoiser config, prediction type and a
    sampled hash of the denoiser's weights (configs and a few MB of reads; nothing is loaded)."""
    path, src = args.pretrained_teacher_model, pretrained_source(args)
    check_hub(path, "--pretrained_teacher_model")
    config = denoiser_config(path, src)
    family = family_of(config)
    return {"teacher": path, "family": family.name, "denoiser_config": config_fingerprint(config),
            "prediction_type": family.prediction_type(family.noise_scheduler_config(path, src)),
            "weights": weights_fingerprint(path, family.denoiser_folder, **src),
            "text_encoders": family.text_folders(path, args.without_t5)}
