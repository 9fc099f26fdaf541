"""Command-line flags (diffusers' names and meanings), YAML config files, and validation with clear errors.

Precedence: built-in defaults < `--config file.yaml` < flags given on the command line.
"""

from .checks import (HUB_ID, check_precision, check_resolution, check_teacher, require_package, resolve_local_model,
                     validate, validate_resume)
from .flags import (DEFAULT_STOP_SIGNALS, LR_SCHEDULERS, TRACKERS, DefaultsFormatter, FlagParser, add_data_flags,
                    add_model_flags, add_shared_flags, add_training_flags)
from .parsing import CONFIG_FILE_NAME, config_text, load_yaml_config, parse_args, save_resolved_config

__all__ = ["HUB_ID", "check_precision", "check_resolution", "check_teacher", "require_package",
           "resolve_local_model", "validate", "validate_resume", "DEFAULT_STOP_SIGNALS", "LR_SCHEDULERS", "TRACKERS",
           "DefaultsFormatter", "FlagParser", "add_data_flags", "add_model_flags", "add_shared_flags",
           "add_training_flags", "CONFIG_FILE_NAME", "config_text", "load_yaml_config", "parse_args",
           "save_resolved_config"]
