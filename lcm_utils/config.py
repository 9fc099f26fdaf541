"""Command-line flags (diffusers' names and meanings), YAML config files, and validation with clear errors.

Precedence: built-in defaults < `--config file.yaml` < flags given on the command line.
Everything here is cheap: it reads at most a few JSON config files of the teacher, never weights.
"""

import argparse
import importlib.util
import json
import os
import re
import sys

import yaml

# diffusers' get_scheduler names; piecewise_constant is left out: it needs step rules no flag provides.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# accelerate's trackers (LoggerType) -> the package each needs; "all" = every installed one, "none" = no logging.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
            "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
            "trackio": "trackio", "all": None, "none": None}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CONFIG_FILE_NAME = "training_config.yaml"
DEFAULT_STOP_SIGNALS = "SIGINT,SIGTERM,SIGUSR1"  # what preemptible and SLURM jobs and a Ctrl-C send
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A bad flag, flag combination or path; the message is one line naming the flag and the fix."""


def add_shared_flags(parser):
    """Flags both scripts take, grouped as in diffusers' train_lcm_distill_sd_wds.py."""
    add_model_flags(parser)
    add_data_flags(parser)
    add_training_flags(parser)
    return parser


def add_model_flags(parser):
    """The teacher and VAE (the scripts and lcm_utils.precompute)."""
    g = parser.add_argument_group("model")
    g.add_argument("--config", type=str, default=None,
                   help="YAML file whose keys are flag names; flags given on the command line override it.")
    g.add_argument("--pretrained_teacher_model", type=str, default=None,
                   help="Teacher: a local diffusers-format folder or a Hub id (required).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="Load the VAE from here instead of the teacher's vae/ (e.g. an fp16-safe VAE); "
                        "this VAE then runs in the mixed-precision dtype, the teacher's VAE stays fp32.")
    g.add_argument("--teacher_revision", type=str, default=None, help="Hub revision of the teacher components.")
    g.add_argument("--revision", type=str, default=None,
                   help="Hub revision used for the teacher when --teacher_revision is not given.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where downloaded Hub models are cached.")


def add_data_flags(parser, training=True):
    """Where samples come from and how they are cropped; training=False leaves out what only the training stream
    does (shuffling, prompt dropping, SDXL's fixed time ids, loader workers), for lcm_utils.precompute."""
    g = parser.add_argument_group("data")
    g.add_argument("--train_shards_path_or_url", type=str, default=None,
                   help="Webdataset shards: path, brace pattern (data/{00000..00099}.tar), several joined by '::', "
                        "or a 'pipe:' command.")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="Image folder with metadata.jsonl (file_name + text) or a .txt caption next to each image.")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="Hugging Face dataset: a Hub name, a local dataset folder (parquet, csv, json, imagefolder) or "
                        "a folder written by Dataset.save_to_disk; its 'train' split is used (needs 'datasets').")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config (subset) of --dataset_name.")
    g.add_argument("--image_column", type=str, default=None,
                   help="Image column of --dataset_name (default 'image'), or the metadata.jsonl key of the image "
                        "path in --train_data_dir (default 'file_name'; 'image' means the same there).")
    g.add_argument("--caption_column", type=str, default="text",
                   help="Caption column of --dataset_name, or the metadata.jsonl key of the caption.")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Use only this many samples per epoch (folder: the first N; shards: the epoch length).")
    g.add_argument("--resolution", type=int, default=512, help="Training resolution (square).")
    g.add_argument("--interpolation_type", type=str, default="bilinear", choices=INTERPOLATIONS,
                   help="Resize filter for the shorter side.")
    g.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop).")
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flip.")
    g.add_argument("--min_original_size", type=int, default=None,
                   help="Skip samples whose original height or width (metadata, else the image) is below this.")
    g.add_argument("--max_watermark_probability", type=float, default=None,
                   help="Skip samples whose 'pwatermark' (LAION json / dataset column) is above this.")
    g.add_argument("--min_aesthetic_score", type=float, default=None,
                   help="Skip samples whose 'aesthetic' score (LAION json / dataset column) is below this.")
    if not training:
        return
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Fraction of captions replaced by the empty prompt.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading worker processes (0 works).")
    g.add_argument("--shuffle_buffer_size", type=int, default=1000, help="Shuffle buffer of each shard reader.")
    g.add_argument("--use_fix_crop_and_size", action="store_true",
                   help="SDXL: condition on original size (resolution, resolution) and crop (0, 0) instead of each "
                        "sample's own.")


def add_training_flags(parser):
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default="lcm-distilled", help="Checkpoints, logs and final weights.")
    g.add_argument("--seed", type=int, default=None, help="Seed of everything random (drawn and recorded if unset).")
    g.add_argument("--train_batch_size", type=int, default=16, help="Batch size per process.")
    g.add_argument("--num_train_epochs", type=int, default=100,
                   help="Epochs, used only when --max_train_steps is not given.")
    g.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches per optimizer step.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Recompute student activations.")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (after warm-up).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the lr by gradient_accumulation_steps * train_batch_size * num_processes.")
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
                   help="diffusers learning-rate schedule, stepped once per optimizer step.")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up in optimizer steps.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (needs bitsandbytes).")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    g.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"),
                   help="Overrides the accelerate config. Student master weights stay fp32.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--cast_teacher_unet", action="store_true", default=True,
                   help="Hold the teacher UNet weights in the mixed-precision dtype (on by default here; diffusers' "
                        "default is off: --teacher_unet_fp32).")
    g.add_argument("--teacher_unet_fp32", action="store_true",
                   help="Keep the teacher UNet weights in fp32 under mixed precision (turns --cast_teacher_unet off; "
                        "for LoRA the teacher is the frozen base).")
    g.add_argument("--channels_last", action="store_true",
                   help="UNet weights and inputs in channels-last memory format.")
    g.add_argument("--torch_compile", action="store_true",
                   help="torch.compile the student, teacher and target UNets (the first steps compile).")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (needs xformers); PyTorch SDPA otherwise.")
    g.add_argument("--vae_encode_batch_size", type=int, default=32, help="Images per VAE encode call.")
    g.add_argument("--encode_batch_size", type=int, default=None,
                   help="Same as --vae_encode_batch_size (the name diffusers' SDXL datasets script uses, where it is "
                        "parsed and ignored); wins when both are given.")
    g.add_argument("--local_rank", type=int, default=-1, help="Set by old launchers; LOCAL_RANK wins.")

    g = parser.add_argument_group("consistency distillation")
    g.add_argument("--w_min", type=float, default=5.0, help="Guidance w ~ U[w_min, w_max] (LCM form: scale - 1).")
    g.add_argument("--w_max", type=float, default=15.0, help="Upper end of the guidance range.")
    g.add_argument("--num_ddim_timesteps", type=int, default=50, help="N of the skipping-step DDIM solver.")
    g.add_argument("--loss_type", type=str, default="l2", choices=("l2", "huber"),
                   help="Consistency distance: L2 or pseudo-Huber.")
    g.add_argument("--huber_c", type=float, default=0.001, help="c of the pseudo-Huber loss.")
    g.add_argument("--timestep_scaling_factor", type=float, default=10.0,
                   help="Scales t in the boundary scalings c_skip/c_out; exported into the LCMScheduler config.")
    g.add_argument("--objective", type=str, default="lcm", choices=("lcm", "tcd", "pcm"),
                   help="Where both consistency predictions map to: lcm, the trajectory's origin (LCMScheduler); "
                        "tcd, a point drawn below the solver's end (TCDScheduler with --tcd_gamma); pcm, the edge of "
                        "the phase (--num_phases; TCDScheduler with gamma 0, --num_phases steps).")
    g.add_argument("--num_phases", type=int, default=4,
                   help="pcm: phases of the trajectory = the sampling steps the student is made for.")
    g.add_argument("--tcd_gamma", type=float, default=0.3,
                   help="tcd: gamma (diffusers' eta) of TCDScheduler's stochastic sampling, for the validation grid "
                        "and the model card.")

    g = parser.add_argument_group("checkpoints, validation, logging")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Optimizer steps between checkpoints (the last step is always checkpointed).")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="'latest' (starts fresh when there is none), a checkpoint name or a path.")
    g.add_argument("--stop_signals", type=str, default=DEFAULT_STOP_SIGNALS,
                   help="Signals that make every rank finish its step, write a checkpoint and exit with status "
                        "128 + signal number (a second one stops at once); comma list, or 'none'.")
    g.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="A non-finite loss skips the update; after this many in a row the run stops with an error.")
    g.add_argument("--validation_steps", type=int, default=200, help="Optimizer steps between validation grids.")
    g.add_argument("--validation_prompts", type=str, nargs="+", default=None,
                   help="Prompts of the validation grid (default: four generic prompts).")
    g.add_argument("--validation_inference_steps", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="LCM step counts shown in the validation grid.")
    g.add_argument("--validation_guidance_scale", type=float, default=None,
                   help="guidance_scale of the validation pipeline (default: w_min + 1).")
    g.add_argument("--report_to", type=str, default="tensorboard", choices=tuple(TRACKERS),
                   help="Tracker for scalars and validation grids (accelerate's names; none = off).")
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, under output_dir.")
    g.add_argument("--logging_steps", type=int, default=10,
                   help="Optimizer steps between logged losses: the host reads the device only then (and before "
                        "checkpoints and validation), so the GPU is never waited for inside a step.")
    g.add_argument("--tracker_project_name", type=str, default="text2image-fine-tune",
                   help="Project name given to the trackers.")
    g.add_argument("--push_to_hub", action="store_true", help="Upload output_dir to the Hub at the end.")
    g.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `hf auth login`).")
    g.add_argument("--hub_model_id", type=str, default=None, help="Default: the output_dir's name.")
    g.add_argument("--verbose", action="store_true",
                   help="Print the full resolved configuration and the libraries' warnings at start.")
    g.add_argument("--dry_run", action="store_true",
                   help="Validate flags, paths and the first batch, print the resolved config, and exit.")
    return parser


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
            raise ConfigError(f"--config: unknown key '{key}' in '{path}'; keys are flag names without '--'")
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


def teacher_revision(args):
    return args.teacher_revision or args.revision


def resolve_local_model(path_or_id, flag):
    """Return the local folder for a path, None for a Hub id; raise for a path that does not exist."""
    if os.path.isdir(path_or_id):
        return path_or_id
    looks_local = path_or_id.startswith(("/", "./", "../", "~")) or os.sep + os.sep in path_or_id
    parent = path_or_id.split("/")[0]
    if looks_local or not HUB_ID.match(path_or_id) or os.path.isdir(parent):
        raise ConfigError(f"{flag}: folder '{path_or_id}' does not exist; pass a diffusers-format model folder "
                          f"or a Hub id like 'org/name'")
    return None


def read_json(folder, *parts):
    with open(os.path.join(folder, *parts)) as f:
        return json.load(f)


def check_teacher(args):
    """Check the teacher folder layout and family; returns (scheduler config, vae config) dicts when local."""
    from .family import family_of

    local = resolve_local_model(args.pretrained_teacher_model, "--pretrained_teacher_model")
    if local is None:
        return None, None
    flag = "--pretrained_teacher_model"
    if not os.path.isfile(os.path.join(local, "unet", "config.json")):
        raise ConfigError(f"{flag}: '{local}' has no unet/config.json; pass a diffusers-format Stable Diffusion folder")
    unet_cfg = read_json(local, "unet", "config.json")
    family = family_of(unet_cfg)
    for sub, fname in (("vae", "config.json"), ("scheduler", "scheduler_config.json")) + tuple(
            (part, "config.json" if part.startswith("text_encoder") else None)
            for pair in family.text_parts for part in pair):
        if not os.path.isdir(os.path.join(local, sub)) or (fname and not os.path.isfile(os.path.join(local, sub, fname))):
            what = f"an {family.name} UNet (addition_embed_type {unet_cfg.get('addition_embed_type')!r}) but " \
                if family.name == "SDXL" else ""
            raise ConfigError(f"{flag}: '{local}' has {what}no {sub}/{fname or ''}; pass a complete diffusers-format "
                              f"{family.name} folder")
    if family.name == "SDXL":
        check_sdxl_dimensions(local, unet_cfg)
    vae_cfg = read_json(local, "vae", "config.json")
    if args.pretrained_vae_model_name_or_path:
        vae_local = resolve_local_model(args.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path")
        vae_cfg = None
        if vae_local is not None:
            if not os.path.isfile(os.path.join(vae_local, "config.json")):
                raise ConfigError(f"--pretrained_vae_model_name_or_path: '{vae_local}' has no config.json; "
                                  f"pass a diffusers AutoencoderKL folder")
            vae_cfg = read_json(vae_local, "config.json")
    return read_json(local, "scheduler", "scheduler_config.json"), vae_cfg


def check_sdxl_dimensions(local, unet_cfg):
    """The UNet's text width and added-embedding size must match the two text encoders (read from the configs,
    so SSD-1B, Vega and fine-tunes pass without any hard-coded size)."""
    te1, te2 = read_json(local, "text_encoder", "config.json"), read_json(local, "text_encoder_2", "config.json")
    text_width = te1.get("hidden_size", 0) + te2.get("hidden_size", 0)
    if unet_cfg.get("cross_attention_dim") not in (None, text_width):
        raise ConfigError(f"--pretrained_teacher_model: unet cross_attention_dim {unet_cfg['cross_attention_dim']} "
                          f"!= the two text encoders' widths {te1.get('hidden_size')} + {te2.get('hidden_size')}")
    expected = (unet_cfg.get("addition_time_embed_dim") or 0) * 6 + te2.get("projection_dim", 0)
    got = unet_cfg.get("projection_class_embeddings_input_dim")
    if got != expected:
        raise ConfigError(f"--pretrained_teacher_model: unet projection_class_embeddings_input_dim is {got}, but 6 "
                          f"time ids x addition_time_embed_dim + text_encoder_2 projection_dim = {expected}")


def require_package(module, flag, package=None):
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{flag} needs the '{package or module}' package: pip install {package or module}")


def validate(args):
    """Check flag values and combinations before anything heavy loads; raise ConfigError (one line)."""
    if not args.pretrained_teacher_model:
        raise ConfigError("--pretrained_teacher_model is required: a diffusers-format folder or a Hub id")
    # The data flags (source, resolution, batch size, ...) are checked by data.check_data_spec.
    if args.encode_batch_size is not None:
        args.vae_encode_batch_size = args.encode_batch_size
    if args.teacher_unet_fp32:
        args.cast_teacher_unet = False
    positive = ("num_train_epochs", "gradient_accumulation_steps", "num_ddim_timesteps", "checkpointing_steps",
                "validation_steps", "vae_encode_batch_size", "max_nonfinite_steps", "logging_steps")
    for name in positive + ("max_train_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name} must be a positive integer, got {value}")
    if any(n <= 0 for n in args.validation_inference_steps):
        raise ConfigError("--validation_inference_steps must be positive integers")
    for name in ("learning_rate", "huber_c", "timestep_scaling_factor"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.lr_warmup_steps < 0 or args.max_grad_norm < 0:
        raise ConfigError("--lr_warmup_steps and --max_grad_norm must be >= 0")
    if args.w_min < 0 or args.w_min > args.w_max:
        raise ConfigError(f"--w_min ({args.w_min}) must be >= 0 and <= --w_max ({args.w_max})")
    if not 1 <= args.num_phases <= args.num_ddim_timesteps:
        raise ConfigError(f"--num_phases must be in 1..{args.num_ddim_timesteps} (--num_ddim_timesteps), "
                          f"got {args.num_phases}")
    if not 0.0 <= args.tcd_gamma <= 1.0:
        raise ConfigError(f"--tcd_gamma must be in [0, 1], got {args.tcd_gamma}")
    if args.max_train_steps is None and args.train_shards_path_or_url and args.max_train_samples is None:
        raise ConfigError("--max_train_steps is required with webdataset shards unless --max_train_samples "
                          "sets the epoch length")
    from .safety import parse_stop_signals

    try:
        parse_stop_signals(args.stop_signals)
    except ValueError as e:
        raise ConfigError(f"--stop_signals: '{e}' is not a signal a process can catch; use a comma list such as "
                          f"SIGINT,SIGTERM,SIGUSR1 or 'none'") from None
    check_precision(args)
    if args.use_8bit_adam:
        require_package("bitsandbytes", "--use_8bit_adam")
    if args.enable_xformers_memory_efficient_attention:
        require_package("xformers", "--enable_xformers_memory_efficient_attention")
    if TRACKERS[args.report_to]:
        require_package(TRACKERS[args.report_to], f"--report_to {args.report_to}")
    if args.push_to_hub:
        if args.report_to in ("wandb", "all") and args.hub_token:
            raise ConfigError("--hub_token with --report_to wandb would expose the token in the logged config; "
                              "log in with `hf auth login` instead")
    validate_resume(args)
    scheduler_cfg, vae_cfg = check_teacher(args)
    if scheduler_cfg is not None:
        T = scheduler_cfg.get("num_train_timesteps", 1000)
        if args.num_ddim_timesteps > T or T % args.num_ddim_timesteps:
            raise ConfigError(f"--num_ddim_timesteps ({args.num_ddim_timesteps}) must divide the teacher's "
                              f"num_train_timesteps ({T}); try 50")
    if vae_cfg is not None:
        check_resolution(args, vae_cfg)


def check_resolution(args, vae_cfg):
    """The training size must give whole latents (a multiple of the VAE factor; the UNet pads odd sizes itself), and
    the stock pipelines (validation, users) accept only multiples of 8: one rule, so that training never stops at
    its first validation."""
    import math

    vae_factor = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    need = math.lcm(8, vae_factor)
    if args.resolution % need:
        near = max(need, round(args.resolution / need) * need)
        raise ConfigError(f"--resolution ({args.resolution}) must be a multiple of {need} (8 for the pipelines, "
                          f"{vae_factor} for the VAE's latents); try {near}")


def check_precision(args):
    """fp16 needs an accelerator: CPU autocast runs bf16 only, and fp16 weights meet fp32 activations at step 0."""
    import torch

    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not (
        torch.cuda.is_available() or getattr(torch, "xpu", None) and torch.xpu.is_available()
        or torch.backends.mps.is_available())
    if precision == "fp16" and on_cpu:
        raise ConfigError("--mixed_precision fp16 needs a GPU: on CPU, PyTorch autocasts to bf16 only, so use "
                          "--mixed_precision bf16 (or no)")


def validate_resume(args):
    """A named checkpoint must exist; 'latest' may find none (a new run starts)."""
    name = args.resume_from_checkpoint
    if name is None or name == "latest":
        return
    if not (os.path.isdir(name) or os.path.isdir(os.path.join(args.output_dir, os.path.basename(name)))):
        raise ConfigError(f"--resume_from_checkpoint: '{name}' does not exist in '{args.output_dir}'; "
                          f"use 'latest' or one of the checkpoint-<step> folders")


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
