"""Command-line flags: diffusers' names and meanings, grouped as in its train_lcm_distill_sd_wds.py."""

import argparse
import difflib

from ..data import INTERPOLATIONS
from ..errors import ConfigError

# diffusers' get_scheduler names; piecewise_constant is left out: it needs step rules no flag provides.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# accelerate's trackers (LoggerType) -> the package each needs; "all" = every installed one, "none" = no logging.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
            "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
            "trackio": "trackio", "all": None, "none": None}
DEFAULT_STOP_SIGNALS = "SIGINT,SIGTERM,SIGUSR1"  # what preemptible and SLURM jobs and a Ctrl-C send


class DefaultsFormatter(argparse.HelpFormatter):
    """--help with every flag's default after its description."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "default:" not in text:
            text += " (default: %(default)s)"
        return text


class FlagParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises ConfigError (one line) instead of printing the whole usage; an unknown
    flag gets the nearest real one, and abbreviations are refused (--learning is not --learning_rate)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=DefaultsFormatter, **kwargs)

    def error(self, message):
        hints = []
        if message.startswith("unrecognized arguments:"):
            for word in message.split(":", 1)[1].split():
                flag = word.split("=")[0]
                if flag.startswith("--"):
                    flags = [o for o in self._option_string_actions if o not in ("-h", "--help")]
                    near = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6)
                    near = near or [o for o in flags if o.startswith(flag) and len(flag) > 3][:1]
                    hints += [f"did you mean {near[0]} for {flag}?"] if near else []
        raise ConfigError(f"{message}{'; ' + ' '.join(hints) if hints else ''} (see --help)")


def add_shared_flags(parser):
    """Flags both scripts take, grouped as in diffusers' train_lcm_distill_sd_wds.py."""
    add_model_flags(parser)
    add_data_flags(parser)
    add_training_flags(parser)
    add_consistency_flags(parser)
    add_output_flags(parser)
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
    g.add_argument("--without_t5", action="store_true",
                   help="SD3: leave the teacher's T5 (text_encoder_3) out: its part of the prompt embedding is zeros, "
                        "as StableDiffusion3Pipeline makes it with text_encoder_3=None (saves T5's memory and time; "
                        "sample the student the same way).")


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
    g.add_argument("--interpolation_type", type=str, default="bilinear", choices=tuple(INTERPOLATIONS),
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


def add_consistency_flags(parser):
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
    g.add_argument("--adv_weight", type=float, default=0.0,
                   help="Weight of the adversarial term (0: none, every result as without it). A discriminator on the "
                        "frozen teacher's blocks with trainable patch heads judges the student's prediction noised "
                        "inside its phase; PCM uses 0.1.")
    g.add_argument("--adv_lr", type=float, default=1e-5,
                   help="Learning rate of the discriminator heads' AdamW (betas 0, 0.999; --adam_weight_decay and "
                        "--adam_epsilon).")
    g.add_argument("--adv_real", type=str, default="target", choices=("target", "data"),
                   help="What the discriminator takes as real: the consistency target noised like the student's "
                        "prediction (target, PCM's choice) or the training latents noised to the same time (data, "
                        "LADD's and SDXL-Lightning's).")
    g.add_argument("--adv_timesteps", type=str, default="uniform", choices=("uniform", "low"),
                   help="Where in the span the adversarial term noises to (inside the phase for PCM, from the origin "
                        "to the top of the grid for LCM and TCD): uniform, or low (u = low + (high - low) r^3: "
                        "mostly little noise, so the discriminator sees detail).")
    g.add_argument("--adv_fake", type=str, default="prediction", choices=("prediction", "x0"),
                   help="What the discriminator takes as fake: the consistency prediction at its point (prediction, "
                        "PCM's choice) or the student's clean estimate x0 at the interval's start, noised to any "
                        "time on the schedule (x0, LADD's way; needs --adv_real data).")


def add_output_flags(parser):
    g = parser.add_argument_group("checkpoints, validation, logging")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Optimizer steps between checkpoints (the last step is always checkpointed).")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="'latest' (starts fresh when there is none), a checkpoint name or a path.")
    g.add_argument("--allow_teacher_change", action="store_true",
                   help="Resume a checkpoint trained against another teacher of the same family and architecture "
                        "(e.g. a fine-tune of the same base, or another prediction type); without it, such a "
                        "resume is refused before anything loads.")
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
