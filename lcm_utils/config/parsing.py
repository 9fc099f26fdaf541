"""Reading flags over a YAML config file (defaults < --config file < command line) and writing them back out."""

import argparse
import difflib
import os
import sys

import yaml

from ..errors import ConfigError

CONFIG_FILE_NAME = "training_config.yaml"


def parse_args(parser, argv=None, foreign=None):
    """Parse argv over the YAML file named by --config; returns a Namespace or raises ConfigError.

    foreign: (flag names of the other script, what to say) so that they get a pointer, not "unknown"."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if foreign:
        for arg in argv:
            if arg.split("=")[0] in foreign[0]:
                raise ConfigError(f"{arg.split('=')[0]} {foreign[1]}")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_yaml_config(parser, known.config, foreign))
    args = parser.parse_args(argv)
    if not hasattr(args, "local_rank"):  # a parser without the flag (lcm_utils.precompute)
        return args
    # Old launchers (torch.distributed.launch) pass --local_rank instead of setting LOCAL_RANK: hand it on to
    # accelerate through the environment; when both are there the environment wins, as in diffusers.
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    elif args.local_rank != -1:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def load_yaml_config(parser, path, foreign=None):
    """Read a YAML config whose keys are flag names; values are converted and checked like flags."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file '{path}' does not exist")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: '{path}' must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in values.items():
        key = str(key).lstrip("-").replace("-", "_")
        if foreign and f"--{key}" in foreign[0]:
            raise ConfigError(f"--config: '{key}' in '{path}' {foreign[1]}")
        if key not in actions or key == "config":
            near = difflib.get_close_matches(key, [k for k in actions if k not in ("help", "config")], n=1, cutoff=0.6)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"--config: unknown key '{key}' in '{path}'; keys are flag names without '--'{hint}")
        out[key] = _convert(actions[key], value, path)
    return out


def _convert(action, value, path):
    """Apply a flag's type and choices to a YAML value."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"--config: '{action.dest}' in '{path}' must be true or false")
        return value
    try:
        if action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            value = [action.type(v) if action.type else v for v in items]
        elif isinstance(value, list) and action.type in (None, str):
            value = ",".join(str(v) for v in value)  # comma-list flags (e.g. lora_target_modules) as YAML lists
        elif action.type is not None:
            value = action.type(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--config: '{action.dest}' in '{path}' has a bad value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"--config: '{action.dest}' in '{path}' must be one of {', '.join(action.choices)}")
    return value


def config_text(args):
    """The resolved flags as YAML, loadable again with --config (the token is left out)."""
    values = {k: v for k, v in sorted(vars(args).items()) if k not in ("config", "hub_token", "local_rank")}
    return yaml.safe_dump(values, sort_keys=False)


def save_resolved_config(args, folder):
    """Write the resolved flags to folder/training_config.yaml; returns the text."""
    text = config_text(args)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, CONFIG_FILE_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(folder, CONFIG_FILE_NAME))
    return text
