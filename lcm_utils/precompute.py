"""Encode a dataset once: VAE posteriors and text embeddings as webdataset shards both training scripts read.

    python -m lcm_utils.precompute --pretrained_teacher_model TEACHER --train_shards_path_or_url 'data/{00..99}.tar' \
        --resolution 512 --output_dir latents/
    accelerate launch -m lcm_utils.precompute ...     # several processes: each writes its own shards

Then train with `--train_shards_path_or_url` set to the pattern it prints: the step then runs no VAE and no text
encoder. Input shards map one to one onto output shards (sample order kept); an image folder or a dataset is cut
into shards of --samples_per_shard samples. Each output shard is written to a partial file and renamed when
complete, so a killed run rerun with the same flags keeps the finished shards and writes only the rest.
The format is described in lcm_utils/latents.py.
"""

import json
import os
import sys
import tarfile
from collections import Counter

import numpy as np
import torch

from .config import (ConfigError, add_data_flags, add_model_flags, check_precision, check_resolution, check_teacher,
                     parse_args)
from .data import (SHARD_DAMAGED, DataError, DataSpec, SkipSample, Transform, _format_counts, check_data_spec,
                   decode_shard_sample, expand_shard_urls, json_record, read_shard)
from .latents import KEPT_METADATA, STORAGE_DTYPES, header_record, shard_pattern, write_header, write_sample

SETTINGS_FILE = "precompute.json"  # the settings the output folder's shards were written with
PARTIAL_SUFFIX = ".partial"


def build_parser():
    from .training import FlagParser

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
    g.add_argument("--storage_dtype", type=str, default="fp16", choices=tuple(STORAGE_DTYPES),
                   help="dtype of the stored latents and embeddings (fp16 halves the disk of fp32; fp32 keeps every "
                        "bit of the encoders' output).")
    g.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"),
                   help="dtype the text encoders (and a VAE without force_upcast) run in; default: accelerate's.")
    g.add_argument("--vae_encode_batch_size", type=int, default=32, help="Images per VAE and text encoder call.")
    g.add_argument("--encode_batch_size", type=int, default=None, help="Same as --vae_encode_batch_size.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the random crops and flips.")
    return parser


def data_spec(args, family_cls):
    return DataSpec.from_flags(args, args.seed, family_cls.uses_original_size)


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
    from .teacher import teacher_family

    family_cls = teacher_family(args)
    check_data_spec(data_spec(args, family_cls))
    return family_cls


# ----------------------------------------------------------------------------- what to encode


def _split(total, parts, part):
    """Size of part `part` when `total` is split as evenly as possible into `parts`."""
    return total // parts + (part < total % parts)


def work_units(spec, samples_per_shard):
    """[(output shard name, function giving the unit's (index, decoded or skip reason, metadata))] in a fixed
    order: one unit per input shard (at most its share of --max_train_samples), else --samples_per_shard items
    of the folder or dataset."""
    if spec.train_shards_path_or_url:
        urls = expand_shard_urls(spec.train_shards_path_or_url)
        from .data import SampleRules

        rules = SampleRules.from_spec(spec)

        def shard_items(url, limit):
            def items():
                count = 0
                for sample in read_shard(url):
                    if limit is not None and count >= limit:
                        return
                    if sample is SHARD_DAMAGED:
                        yield count, SHARD_DAMAGED, {}
                        continue
                    meta = json_record(sample["json"]) if "json" in sample else {}
                    try:
                        image, caption, _, size = decode_shard_sample(sample, rules)
                        yield count, (image, caption, size), meta
                    except SkipSample as skip:
                        yield count, skip.reason, meta
                    count += 1
            return items

        limits = [None if spec.max_train_samples is None else _split(spec.max_train_samples, len(urls), j)
                  for j in range(len(urls))]
        return [(f"latents-{j:06d}.tar", shard_items(url, limits[j])) for j, url in enumerate(urls)]
    if spec.train_data_dir:
        from .data import FolderSource

        source = FolderSource(spec, count_listing=True)
        size, meta_of = len(source.items), lambda i: (source.records or {}).get(source.items[i], {})
    else:
        from .hf_dataset import DatasetSource

        source = DatasetSource(spec)
        size, meta_of = source.size, lambda i: source.rows[i]

    def indexed(first, last):
        def items():
            for i in range(first, last):
                try:
                    image, caption, _, original = source.decode(i)
                    yield i, (image, caption, original), meta_of(i)
                except SkipSample as skip:
                    yield i, skip.reason, {}
        return items

    per = samples_per_shard
    return [(f"latents-{j:06d}.tar", indexed(j * per, min(size, (j + 1) * per))) for j in range(-(-size // per))]


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

    from .teacher import load_encoders

    # As Accelerator does: `accelerate launch --cpu` (or --multi_gpu on a CPU machine) says so in the environment.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    spec = data_spec(args, family_cls)
    units = work_units(spec, args.samples_per_shard)
    family, vae = load_encoders(args, state.device, dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, args.resolution // factor, args.resolution // factor)
    record = header_record(args, family, latent_shape, args.storage_dtype, args.crops_per_image)
    settings = {"header": record, "source": args.train_shards_path_or_url or args.train_data_dir or args.dataset_name,
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
    storage_dtype = STORAGE_DTYPES[args.storage_dtype]
    skipped, written = Counter(), 0
    bar = progress_bar(state.is_main_process, len(todo), done_before)
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
        print(f"wrote {new} shard(s) ({samples} samples; skipped {_format_counts(counts)}), kept {kept} finished "
              f"before, in {args.output_dir}", flush=True)
        print(f"train with: --train_shards_path_or_url '{shard_pattern(paths)}'", flush=True)
    if torch.distributed.is_initialized():  # a process group left to interpreter exit can abort the process
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return 0


class progress_bar:
    """tqdm over shards on a terminal (samples in the postfix); a line per shard in a log file."""

    def __init__(self, enabled, total, done_before):
        from tqdm.auto import tqdm

        self.enabled, self.total, self.count, self.shards = enabled, total, 0, 0
        self.bar = tqdm(total=total, desc="shards", unit="shard") if enabled and sys.stderr.isatty() else None
        if enabled and done_before:
            print(f"{done_before} shard(s) of this process were finished before: kept", flush=True)

    def samples(self, n):
        self.count += n
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.count} samples")

    def shard_done(self):
        self.shards += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"shard {self.shards}/{self.total} written ({self.count} samples so far)", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv=None):
    from .training import quiet_libraries, report

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
