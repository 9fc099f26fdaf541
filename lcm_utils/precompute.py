"""Encode a dataset once: VAE posteriors and text embeddings as webdataset shards both training scripts read.

    python -m lcm_utils.precompute --pretrained_teacher_model TEACHER --train_shards_path_or_url 'data/{00..99}.tar' \
        --resolution 512 --output_dir latents/
    accelerate launch -m lcm_utils.precompute ...     # several processes: each writes its own shards

Then train with `--train_shards_path_or_url` set to the pattern it prints: the step then runs no VAE and no text
encoder. Input shards map one to one onto output shards (sample order kept); an image folder or a dataset is cut
into shards of --samples_per_shard samples. Each output shard is written to a partial file and renamed when
complete, so a killed run rerun with the same flags keeps the finished shards and writes only the rest.
The format is described in lcm_utils/data/sources/latents.py. This module also checks that such shards fit a
training run (`check_precomputed`): same family, resolution, VAE and text encoders.
"""

import json
import os
import sys
import tarfile
from collections import Counter

import numpy as np
import torch

from .config import (FlagParser, add_data_flags, add_model_flags, check_precision, check_resolution, check_teacher,
                     parse_args)
from .console import ProgressDisplay, quiet_libraries
from .data import DataSpec, Transform, check_data_spec, data_location, format_counts, given_sources
from .data.sources.latents import FORMAT, KEPT_METADATA, shard_pattern, write_header, write_sample
from .errors import ConfigError, DataError, report
from .families import load_encoders, pretrained_source, teacher_family, vae_scale_factor
from .fingerprints import config_fingerprint, weights_differ, weights_fingerprint
from .tensors import DTYPES, precision_dtype

SETTINGS_FILE = "precompute.json"  # the settings the output folder's shards were written with
PARTIAL_SUFFIX = ".partial"


def build_parser():
    parser = FlagParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    add_data_flags(parser, training=False)
    g = parser.add_argument_group("precompute")
    g.add_argument("--output_dir", type=str, default=None, help="Folder for the shards (required).")
    g.add_argument("--crops_per_image", type=int, default=1,
                   help="Crops (and flips) of each image, each stored as its own sample (random crops need > 1 to "
                        "vary; with --center_crop and no flip they are all the same).")
    g.add_argument("--samples_per_shard", type=int, default=1000,
                   help="Source samples per output shard for --train_data_dir and --dataset_name (input shards map "
                        "one to one).")
    g.add_argument("--storage_dtype", type=str, default="fp16", choices=tuple(DTYPES),
                   help="dtype of the stored latents and embeddings (fp16 halves the disk of fp32; fp32 keeps every "
                        "bit of the encoders' output).")
    g.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"),
                   help="dtype the text encoders (and a VAE without force_upcast) run in; default: accelerate's.")
    g.add_argument("--vae_encode_batch_size", type=int, default=32, help="Images per VAE and text encoder call.")
    g.add_argument("--encode_batch_size", type=int, default=None, help="Same as --vae_encode_batch_size.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the random crops and flips.")
    return parser


def validate(args):
    """One-line ConfigError / DataError for bad flags, before any weights load."""
    if not args.pretrained_teacher_model:
        raise ConfigError("--pretrained_teacher_model is required: a diffusers-format folder or a Hub id")
    if not args.output_dir:
        raise ConfigError("--output_dir is required: the folder the shards are written to")
    if args.encode_batch_size is not None:
        args.vae_encode_batch_size = args.encode_batch_size
    for name in ("crops_per_image", "samples_per_shard", "vae_encode_batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    check_precision(args)
    _, vae_cfg = check_teacher(args)
    if vae_cfg is not None:
        check_resolution(args, vae_cfg)
    family_cls = teacher_family(args)
    check_data_spec(DataSpec.from_flags(args, args.seed, family_cls.uses_original_size))
    return family_cls


# ----------------------------------------------------------------------------- the shards fit the run


def vae_source(args):
    """(path or id, subfolder) of the VAE a run uses."""
    if args.pretrained_vae_model_name_or_path:
        return args.pretrained_vae_model_name_or_path, None
    return args.pretrained_teacher_model, "vae"


def encoder_fingerprints(args, family_cls):
    """Fingerprints of the VAE and each text encoder: their configs, and a sampled hash of their weight files (a few
    MB of reads; see fingerprints.py), so that shards encoded by other weights of the same shape are told apart."""
    from diffusers import AutoencoderKL
    from transformers import PretrainedConfig

    src = pretrained_source(args)
    vae_path, vae_sub = vae_source(args)
    vae_src = src if vae_sub else dict(cache_dir=args.cache_dir)
    vae = AutoencoderKL.load_config(vae_path, subfolder=vae_sub, **vae_src)
    folders = family_cls.text_folders(args.pretrained_teacher_model, args.without_t5)
    texts = [PretrainedConfig.get_config_dict(args.pretrained_teacher_model, subfolder=folder, **src)[0]
             for folder in folders]
    return {"vae_config": config_fingerprint(vae), "text_encoders": folders,
            "text_encoder_configs": [config_fingerprint(t) for t in texts],
            "scaling_factor": float(vae.get("scaling_factor", 0.18215)), "shift_factor": vae.get("shift_factor"),
            "vae_weights": weights_fingerprint(vae_path, vae_sub, **vae_src),
            "text_encoder_weights": [weights_fingerprint(args.pretrained_teacher_model, folder, **src)
                                     for folder in folders]}


def header_record(args, family, latent_shape, storage_dtype, crops_per_image):
    """The JSON record of a precomputed shard's header."""
    vae_path, vae_sub = vae_source(args)
    return {"format": FORMAT, "family": family.name, "teacher": args.pretrained_teacher_model,
            "vae": vae_path + (f"/{vae_sub}" if vae_sub else ""), **encoder_fingerprints(args, type(family)),
            "resolution": args.resolution, "latent_shape": list(latent_shape), "center_crop": args.center_crop,
            "random_flip": args.random_flip, "interpolation_type": args.interpolation_type,
            "crops_per_image": crops_per_image, "storage_dtype": storage_dtype, "latent": "posterior mean and std",
            "force_zeros_for_empty_prompt": family.force_zeros}


def check_precomputed(record, args, family_cls):
    """ConfigError (one line, before any weights load) when the shards were written for another teacher family,
    resolution, VAE or text encoder than this run's; returns notes on the data flags the shards already applied."""
    where = "--train_shards_path_or_url"
    if record["family"] != family_cls.name:
        raise ConfigError(f"{where}: the precomputed shards hold {record['family']} text embeddings, but the teacher "
                          f"'{args.pretrained_teacher_model}' is {family_cls.name}; precompute them with this teacher")
    if record["resolution"] != args.resolution:
        raise ConfigError(f"{where}: the precomputed shards hold latents of {record['resolution']} px images, this "
                          f"run has --resolution {args.resolution}; pass --resolution {record['resolution']} or "
                          f"precompute at {args.resolution}")
    ours = encoder_fingerprints(args, family_cls)
    if ours["vae_config"] != record["vae_config"] or ours["scaling_factor"] != record["scaling_factor"]:
        vae_path, vae_sub = vae_source(args)
        raise ConfigError(f"{where}: the precomputed latents come from the VAE '{record['vae']}', whose config "
                          f"differs from this run's ('{vae_path}{'/' + vae_sub if vae_sub else ''}'); pass the same "
                          f"VAE (--pretrained_vae_model_name_or_path) or precompute with this one")
    if record.get("text_encoders", ours["text_encoders"]) != ours["text_encoders"]:
        raise ConfigError(f"{where}: the precomputed text embeddings come from {', '.join(record['text_encoders'])}, "
                          f"this run encodes with {', '.join(ours['text_encoders'])}; pass the text-encoder flags "
                          f"they were precomputed with (--without_t5) or precompute again")
    if ours["text_encoder_configs"] != record["text_encoder_configs"]:
        raise ConfigError(f"{where}: the precomputed text embeddings come from the text encoder(s) of "
                          f"'{record['teacher']}', whose configs differ from those of "
                          f"'{args.pretrained_teacher_model}'; precompute with this teacher")
    # Shards written before weights were fingerprinted carry configs only; those are compared above.
    if weights_differ(record.get("vae_weights"), ours["vae_weights"]):
        raise ConfigError(f"{where}: the precomputed latents were encoded by the VAE of '{record['vae']}', whose "
                          f"weights differ from this run's (same config, other weights); precompute with this VAE")
    recorded_texts = record.get("text_encoder_weights") or []
    if any(weights_differ(a, b) for a, b in zip(recorded_texts, ours["text_encoder_weights"])):
        raise ConfigError(f"{where}: the precomputed text embeddings were encoded by the text encoder(s) of "
                          f"'{record['teacher']}', whose weights differ from those of "
                          f"'{args.pretrained_teacher_model}' (same configs, other weights); precompute with this "
                          f"teacher")
    notes = []
    for flag in ("center_crop", "random_flip", "interpolation_type"):
        if getattr(args, flag) != record[flag]:
            notes.append(f"--{flag} {getattr(args, flag)} has no effect: the precomputed shards were cropped with "
                         f"{flag} {record[flag]}")
    return notes


# ----------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_batch(family, vae, examples, storage_dtype):
    """Per example the stored tensors: the VAE posterior's mean and std [C, h, w] and the text conditions."""
    pixels = torch.stack([e["pixel_values"] for e in examples]).to(vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    text = family.encode_text([e["caption"] for e in examples])
    out = []
    for i in range(len(examples)):
        tensors = {"latent_mean": posterior.mean[i], "latent_std": posterior.std[i],
                   **{k: v[i] for k, v in text.items()}}
        out.append({k: v.to("cpu", dtype=storage_dtype) for k, v in tensors.items()})
    return out


def write_unit(path, items, transform, seed, unit, crops, family, vae, record, batch_size, storage_dtype, skipped,
               progress):
    """Encode one unit into `path` (via a partial file, renamed when complete); returns the samples written."""
    tmp = path + PARTIAL_SUFFIX
    written = 0
    with tarfile.open(tmp, "w") as tar:
        write_header(tar, record, family.unconditional_text())
        pending = []

        def flush():
            nonlocal written
            for example, tensors in zip(pending, encode_batch(family, vae, pending, storage_dtype)):
                write_sample(tar, example["key"], tensors, example["caption"], example["meta"])
            written += len(pending)
            progress(len(pending))
            pending.clear()

        for index, decoded, meta in items():
            if isinstance(decoded, str):
                skipped[decoded] += 1
                continue
            image, caption, size = decoded
            kept = {k: meta[k] for k in KEPT_METADATA if k in meta}
            for crop in range(crops):
                example = transform(image, caption, np.random.default_rng([seed, unit, index, crop]), size)
                example["key"] = f"{index:08d}-{crop}"
                example["meta"] = {"original_size": list(example["original_size"]),
                                   "crop_top_left": list(example["crop_top_left"]), **kept}
                pending.append(example)
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
    os.replace(tmp, path)
    return written


def check_settings(output_dir, settings):
    """Shards already in output_dir must come from the same settings; a new folder records them."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ConfigError(f"--output_dir: '{output_dir}' holds shards precomputed with other settings "
                              f"({', '.join(changed)}); use a new --output_dir or delete that one")
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def precompute(args, family_cls):
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    # As Accelerator does: `accelerate launch --cpu` (or --multi_gpu on a CPU machine) says so in the environment.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    dtype = precision_dtype(precision)
    spec = DataSpec.from_flags(args, args.seed, family_cls.uses_original_size)
    # The source the data flag names, read as images (precomputing precomputed shards is not a use).
    units = given_sources(spec)[0](spec).precompute_units(args.samples_per_shard)
    family, vae = load_encoders(args, state.device, dtype)
    factor = vae_scale_factor(vae.config)
    latent_shape = (vae.config.latent_channels, args.resolution // factor, args.resolution // factor)
    record = header_record(args, family, latent_shape, args.storage_dtype, args.crops_per_image)
    settings = {"header": record, "source": data_location(args),
                "seed": args.seed, "max_train_samples": args.max_train_samples,
                "samples_per_shard": args.samples_per_shard, "filters": [args.min_original_size,
                                                                         args.max_watermark_probability,
                                                                         args.min_aesthetic_score],
                "image_column": args.image_column, "caption_column": args.caption_column}
    error = None
    if state.is_main_process:
        try:
            check_settings(args.output_dir, settings)
        except ConfigError as e:
            error = str(e)
    error = gather_object([error])[0] if state.num_processes > 1 else error
    if error:
        raise ConfigError(error)
    state.wait_for_everyone()

    paths = [os.path.join(args.output_dir, name) for name, _ in units]
    mine = [j for j in range(len(units)) if j % state.num_processes == state.process_index]
    todo = [j for j in mine if not os.path.isfile(paths[j])]
    done_before = len(mine) - len(todo)
    transform = Transform.from_spec(spec)
    storage_dtype = DTYPES[args.storage_dtype]
    skipped, written = Counter(), 0
    bar = ShardProgress(state.is_main_process, len(todo), done_before)
    for j in todo:
        written += write_unit(paths[j], units[j][1], transform, args.seed, j, args.crops_per_image, family, vae,
                              record, args.vae_encode_batch_size, storage_dtype, skipped, bar.samples)
        bar.shard_done()
    bar.close()
    totals = gather_object([(written, len(todo), done_before, dict(skipped))])
    state.wait_for_everyone()
    if state.is_main_process:
        counts = Counter()
        for _, _, _, part in totals:
            counts.update(part)
        samples, new, kept = (sum(t[i] for t in totals) for i in range(3))
        print(f"wrote {new} shard(s) ({samples} samples; skipped {format_counts(counts)}), kept {kept} finished "
              f"before, in {args.output_dir}", flush=True)
        print(f"train with: --train_shards_path_or_url '{shard_pattern(paths)}'", flush=True)
    if torch.distributed.is_initialized():  # a process group left to interpreter exit can abort the process
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return 0


class ShardProgress(ProgressDisplay):
    """The shards of this process: the bar over shards with the samples in its postfix; a line per shard in a log
    file."""

    def __init__(self, enabled, total, done_before):
        super().__init__(total, desc="shards", unit="shard", enabled=enabled)
        self.count, self.shards = 0, 0
        if enabled and done_before:
            print(f"{done_before} shard(s) of this process were finished before: kept", flush=True)

    def samples(self, n):
        self.count += n
        self.status(f"{self.count} samples")

    def shard_done(self):
        self.shards += 1
        self.advance()
        self.line(f"shard {self.shards}/{self.total} written ({self.count} samples so far)")


def main(argv=None):
    try:
        args = parse_args(build_parser(), argv)
        family_cls = validate(args)
        quiet_libraries()
        return precompute(args, family_cls)
    except (ConfigError, DataError, FileNotFoundError) as e:
        report(e)
        sys.exit(2)


if __name__ == "__main__":
    raise SystemExit(main())
