"""Entry point of both scripts: parse and validate the flags (one-line errors, exit 2), then dry-run or train."""

import sys

from ..config import FlagParser, add_shared_flags, config_text, parse_args, validate
from ..console import quiet_libraries
from ..data import DataSpec, TrainStream, check_data_spec, data_report
from ..errors import ConfigError, DataError, ReaderError, TrainingError, report
from ..families import teacher_family
from ..precompute import check_precomputed
from .loop import train


def build_parser(method_cls, description):
    parser = FlagParser(description=description)
    add_shared_flags(parser)
    method_cls.add_flags(parser)
    guidance = parser._option_string_actions["--validation_guidance_scale"]
    guidance.help = f"guidance_scale of the validation grid (default: {method_cls.validation_guidance_text})."
    return parser


def main(method_cls, description, argv=None):
    """Parse, validate, then dry-run or train; a user error is one line with exit status 2, a run that cannot go
    on one line with exit status 1."""
    method = method_cls()
    parser = build_parser(method_cls, description)
    argv = sys.argv[1:] if argv is None else argv
    try:
        foreign = (method.foreign_flags, f"is not a flag of {method.name}; use {method.foreign_script}")
        args = parse_args(parser, argv, foreign)
        validate(args)
        method.check_args(args)
        check_data_spec(DataSpec.from_flags(args, args.seed or 0))
        if args.dry_run:
            return dry_run(args)
        return train(args, method)
    except ReaderError as e:
        report(e, every_rank=True)
        sys.exit(2)
    except (ConfigError, DataError, FileNotFoundError) as e:
        report(e)
        sys.exit(2)
    except TrainingError as e:
        report(e)
        sys.exit(1)


def dry_run(args):
    """Check the teacher's family, the data and its first batch, then print the resolved config and the batch's
    shapes; load no model weights. An error is the only line printed."""
    if not args.verbose:
        quiet_libraries()
    # Reads the teacher's denoiser config (fetched for a Hub id): a wrong id fails here, as the real run would.
    family_cls = teacher_family(args)
    stream = TrainStream(DataSpec.from_flags(args, args.seed or 0, family_cls.uses_original_size))
    notes = check_precomputed(stream.precomputed, args, family_cls) if stream.precomputed else []
    batch = next(iter(stream))
    print(config_text(args))
    for note in notes:
        print(f"note: {note}")
    content = "latent_mean" if stream.precomputed else "pixel_values"
    print(f"first batch: {content} {tuple(batch[content].shape)}, captions {batch['captions'][:2]}")
    if stream.skipped:
        print(data_report(stream.skipped, len(batch["captions"]))[0])
    print("dry run OK: flags, paths and data are valid; no model was loaded")
    return 0
