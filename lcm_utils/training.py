"""The one training loop both scripts share: setup, the step, checkpoint/resume, validation, logging, export.

What differs between full distillation and LCM-LoRA lives in a `DistillationMethod` subclass in each script.
"""

import argparse
import glob
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import (HUB_ID, ConfigError, add_shared_flags, config_text, parse_args, save_resolved_config,
                     teacher_revision, validate)
from .data import DataError, DataSpec, ReaderError, TrainStream, check_data_spec
from .engines import (check_engine_support, checkpoint_engine, configure_deepspeed, engine_name, frozen_loading,
                      load_optimizer_state, save_optimizer_state, uses_deepspeed, uses_fsdp, zero_stage)
from .objective import SolverSchedule, lcd_loss, make_objective
from .safety import StepHealth, StopAgreement, StopSignals, TrainingError, parse_stop_signals, resume_command
from .evaluation import decode_to_array, labelled_grid, sampling_kwargs
from .latents import check_precomputed, sample_latents
from .teacher import encode_images, load_teacher, teacher_family

DEFAULT_VALIDATION_PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "a watercolor painting of a lighthouse at sunset",
    "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table",
]
SKIP_LOG_EVERY = 50  # optimizer steps between logged skipped-sample counts (they need a gather)
REFERENCE_STEPS = 50  # the teacher's DDIM sampler that validation compares the student's samples with
METRICS_FILE = "metrics.jsonl"  # under output_dir/validation: one line per validation
REPORT_GRACE_S = 5  # how long other ranks wait after an error that rank 0 reports
EXPORT_STATE = "exported.json"  # which run and step the exported weights in output_dir come from


class DistillationMethod:
    """What a script defines: how the student and target are built, what trains, how results are saved."""

    name = "base"

    @staticmethod
    def add_flags(parser):
        """Flags only this method takes."""

    foreign_flags = ()  # the other script's flags, rejected with a pointer to it
    foreign_script = None

    def check_args(self, args):
        """Reject flag values that make no sense for this method (ConfigError)."""

    def setup(self, teacher, args, weight_dtype):
        """What every method keeps (the family for pipelines and LoRA files, the flags for the model card), then
        the method's own build."""
        self.family, self.args = teacher.family, args
        self.build(teacher, args, weight_dtype)

    def build(self, teacher, args, weight_dtype):
        """Set self.student (its trainable weights fp32) and the target; cast the teacher per --cast_teacher_unet."""
        raise NotImplementedError

    def unets(self):
        """Every UNet the run holds (for attention backends)."""
        raise NotImplementedError

    def trainable_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]

    def student_forward(self, z, t, cond, w):
        raise NotImplementedError

    def teacher_forward(self, z, t, cond):
        raise NotImplementedError

    def target_forward(self, z, t, cond, w):
        raise NotImplementedError

    def update_target(self, gate=None):
        """Called after every optimizer step (EMA); gate: a device scalar, 0 when the step's update was skipped."""

    def check_engine(self, args, acc):
        """Before any model loads: reject what this method cannot do under the run's engine (FSDP, ZeRO-3)."""

    def shard(self):
        """Under FSDP, after accelerate sharded the student: shard what must match it (the EMA target)."""

    def snapshot(self, student_only=False):
        """The full weights that save_state/export write, {part: {name: tensor}}. Called on every rank (a
        sharded student is gathered); only the main process's result holds tensors."""
        raise NotImplementedError

    def save_state(self, folder, weights):
        """Write a snapshot() into a checkpoint folder (main process)."""
        raise NotImplementedError

    def load_state(self, folder):
        """Every rank reads the checkpoint's weights into its student and target."""
        raise NotImplementedError

    def export(self, output_dir, weights):
        """Write the final weights of a snapshot() (main process); returns the model card's usage section."""
        raise NotImplementedError

    def validation_pipeline(self, folder, teacher, args, device, weights):
        """Save the student of a snapshot(student_only=True) to folder and load it into a fresh stock pipeline,
        the way a user would (main process)."""
        raise NotImplementedError

    def default_validation_guidance(self, args):
        """guidance_scale of the validation grid when --validation_guidance_scale is unset."""
        raise NotImplementedError

    def reference_guidance(self, args):
        """guidance_scale of the teacher's samples that validation measures the student against."""
        raise NotImplementedError

    validation_guidance_text = ""  # that default, in words, for --help


def in_dtype(dtype, z, cond):
    """(z, cond) with every floating tensor in `dtype`, the dtype of the UNet they go into. Under autocast this
    changes no value; under DeepSpeed, where accelerate does not autocast, a half-precision engine must get
    half-precision inputs, and an fp32 teacher fp32 ones (the text encoders run in the low precision)."""
    if isinstance(cond, dict):  # SDXL's time ids stay fp32: the UNet embeds them in fp32 (1366 is not a bf16)
        return z.to(dtype), {key: value if key == "time_ids" else in_dtype(dtype, z, value)[1]
                             for key, value in cond.items()}
    return z.to(dtype), (cond.to(dtype) if cond.is_floating_point() else cond)


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
        import difflib

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


def build_parser(method_cls, description):
    parser = FlagParser(description=description)
    add_shared_flags(parser)
    method_cls.add_flags(parser)
    guidance = parser._option_string_actions["--validation_guidance_scale"]
    guidance.help = f"guidance_scale of the validation grid (default: {method_cls.validation_guidance_text})."
    return parser


def data_spec(args, seed, family=None):
    """The data flags as a DataSpec; `family` (SD or SDXL class) says whether original sizes are read."""
    return DataSpec.from_flags(args, seed, True if family is None else family.uses_original_size)


def main(method_cls, description, argv=None):
    """Entry point of both scripts: parse, validate (one-line errors, exit 2), then dry-run or train."""
    method = method_cls()
    parser = build_parser(method_cls, description)
    argv = sys.argv[1:] if argv is None else argv
    try:
        foreign = (method.foreign_flags, f"is not a flag of {method.name}; use {method.foreign_script}")
        args = parse_args(parser, argv, foreign)
        validate(args)
        method.check_args(args)
        check_data_spec(data_spec(args, args.seed or 0))
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


def report(error, every_rank=False):
    """The one error line. A mistake every rank finds is said by the first process only; what only one rank's
    data reader found is said by that rank, named."""
    rank = os.environ.get("RANK", "0")
    if every_rank and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"error: [rank {rank}] {error}", file=sys.stderr, flush=True)
    elif rank == "0":
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        # The launcher stops every rank when the first one exits: let the first process say why, and exit first.
        time.sleep(REPORT_GRACE_S)


def dry_run(args):
    """Print the resolved config and the first batch's shapes; load no model weights."""
    print(config_text(args))
    # Reads the teacher's UNet config (fetched for a Hub id): a wrong id fails here, as the real run would.
    family_cls = teacher_family(args)
    stream = TrainStream(data_spec(args, args.seed or 0, family_cls))
    if stream.precomputed:
        for note in check_precomputed(stream.precomputed, args, family_cls):
            print(f"note: {note}")
    batch = next(iter(stream))
    content = "latent_mean" if stream.precomputed else "pixel_values"
    print(f"first batch: {content} {tuple(batch[content].shape)}, captions {batch['captions'][:2]}, "
          f"skipped so far {stream.skipped}")
    print("dry run OK: flags, paths and data are valid; no model was loaded")
    return 0


class Run:
    """State of one training run; methods are the loop's steps."""

    def __init__(self, args, method):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

        self.args, self.method = args, method
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                logging_dir=os.path.join(args.output_dir, args.logging_dir)))
        if args.seed is None:  # draw one on the main process and record it, so the run can be repeated
            args.seed = broadcast_object_list([int.from_bytes(os.urandom(4), "little") >> 1])[0]
        # Names this run across its checkpoints and resumes (a resume takes the checkpoint's), for the export record.
        self.run_id = broadcast_object_list([os.urandom(8).hex()])[0]
        set_seed(args.seed)  # same on every rank: identical initialisation everywhere
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if acc.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            ckpt.remove_stale_partials(args.output_dir)
        self.repo_id = None
        if args.push_to_hub:  # the main process creates the repo; every rank stops if that failed
            outcome = create_hub_repo(args) if acc.is_main_process else None
            outcome = broadcast_object_list([outcome])[0]
            if isinstance(outcome, ConfigError):
                raise outcome
            self.repo_id = outcome

    def log(self, *messages):
        if self.accelerator.is_main_process:
            print(*messages, flush=True)


def train(args, method):
    if not args.verbose:
        quiet_libraries()
    run = Run(args, method)
    # Installed first: a signal during the (long) model loading is honoured at the first step boundary.
    stop = StopSignals(parse_stop_signals(args.stop_signals), log=run.log)
    try:
        return train_loop(run, stop)
    finally:
        stop.restore()


def train_loop(run, stop):
    args, method, acc = run.args, run.method, run.accelerator
    device = acc.device
    # The data first: a dataset column or source error is reported before minutes of model loading.
    family_cls = teacher_family(args)
    stream = TrainStream(data_spec(args, args.seed, family_cls), acc.process_index, acc.num_processes)
    if stream.precomputed:
        for note in check_precomputed(stream.precomputed, args, family_cls):
            run.log(f"note: {note}")
    check_engine_support(acc)
    method.check_engine(args, acc)
    # From precomputed shards the VAE and text encoders only serve validation: they wait on the CPU.
    with frozen_loading(acc):
        teacher = load_teacher(args, device, run.weight_dtype, torch.device("cpu") if stream.precomputed else device)
    if stream.precomputed:
        teacher.family.set_unconditional_text(stream.unconditional_text, device)
    method.setup(teacher, args, run.weight_dtype)
    if args.enable_xformers_memory_efficient_attention:
        for unet in method.unets():
            unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        method.student.enable_gradient_checkpointing()
    for unet in method.unets():
        if args.channels_last:
            unet.to(memory_format=torch.channels_last)
        if args.torch_compile:  # in place: the modules keep their type, state dict names and save_pretrained
            unet.compile()

    params = method.trainable_parameters()
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * acc.num_processes
    optimizer = make_optimizer(params, lr, args)
    max_train_steps = resolve_max_train_steps(args, stream, acc.num_processes)
    from diffusers.optimization import get_scheduler

    # Not passed to accelerator.prepare: stepped once per optimizer step whatever the number of processes.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_train_steps)
    if uses_deepspeed(acc):
        configure_deepspeed(acc, args)
    method.student_model, optimizer = acc.prepare(method.student, optimizer)
    if uses_fsdp(acc):
        method.shard()
        # FSDP replaced the parameters by their shards. Clipping takes the whole model's: accelerate clips those
        # in one pass (frozen ones have no gradient), and unscales fp16 gradients twice for a subset.
        params = list(method.student_model.parameters())
    schedule = SolverSchedule.from_scheduler(teacher.noise_scheduler, args.num_ddim_timesteps,
                                             args.timestep_scaling_factor, device)
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + acc.process_index)
    objective = make_objective(args.objective, args.num_phases)

    global_step = resume(run, optimizer, lr_scheduler, stream, generator)
    saved_step = global_step if global_step else None  # the step of the newest complete checkpoint
    if acc.is_main_process:
        text = save_resolved_config(args, args.output_dir)
        run.log(text if args.verbose else summary(args, teacher, acc, bool(stream.precomputed)))
        acc.init_trackers(args.tracker_project_name, config=tracker_config(args))
    if global_step >= max_train_steps:
        run.log(f"the checkpoint is at step {global_step}, --max_train_steps is {max_train_steps}: nothing to train")
        finish(run, teacher, global_step)
        return 0
    with_objective = "" if args.objective == "lcm" else f" with the {args.objective.upper()} objective"
    run.log(f"training {method.name}{with_objective}: {max_train_steps} steps, {acc.num_processes} process(es), "
            f"batch {args.train_batch_size} x accumulation {args.gradient_accumulation_steps}, from step {global_step}")

    def checkpoint(step):
        nonlocal saved_step
        if saved_step != step:
            save_checkpoint(run, step, optimizer, lr_scheduler, stream, generator)
            saved_step = step

    progress = Progress(max_train_steps, global_step, acc.is_main_process)
    health = StepHealth(args.max_nonfinite_steps, device, skips_on_device(acc, optimizer))
    agree_stop = StopAgreement(acc)
    window = Window(global_step, args.train_batch_size * args.gradient_accumulation_steps * acc.num_processes)
    gathered_at = global_step

    def look(step):
        """The host's read of the device (its only wait for it): log the steps since the last look."""
        nonlocal gathered_at
        try:
            loss, skipped = health.look(step, saved_step and ckpt.final_path(args.output_dir, saved_step), run.log)
        except TrainingError:
            progress.close()  # the error line starts on a line of its own
            raise
        logs = {"train/loss": loss, "train/lr": lr_scheduler.get_last_lr()[0],
                "train/samples_per_s": window.samples_per_s(step), "train/nonfinite_skipped": skipped}
        if step - gathered_at >= SKIP_LOG_EVERY or step == max_train_steps:
            logs.update(gather_skip_counts(acc, stream))
            gathered_at = step
        progress.show(step, loss, logs["train/lr"], logs["train/samples_per_s"])
        acc.log(logs, step=step)

    for batch in stream:
        with acc.accumulate(method.student_model):
            z0 = clean_latents(teacher, batch, args.vae_encode_batch_size, generator, stream.precomputed)
            if args.channels_last:
                z0 = z0.contiguous(memory_format=torch.channels_last)
            cond, uncond = teacher.family.conditions(batch, args.resolution, args.use_fix_crop_and_size)
            w = args.w_min + (args.w_max - args.w_min) * torch.rand(
                z0.shape[0], generator=generator, device=generator.device)
            with acc.autocast():
                loss = lcd_loss(z0, cond, uncond, w.to(device), method.student_forward, method.teacher_forward,
                                method.target_forward, schedule, args.loss_type, args.huber_c, generator, objective)
            acc.backward(loss)
            health.observe(loss)
            if acc.sync_gradients:
                # 1 when every rank's losses of this step were finite: else no update anywhere (weights,
                # optimizer state, EMA target), decided on the device where the optimizer can skip by itself.
                gate = health.gate(acc, global_step + 1)
                if health.on_device:
                    arm_skip(optimizer, gate)
                if health.on_device or bool(gate):
                    if args.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            continue
        stop_signal = agree_stop(stop.received)  # host data only: no wait for the device
        lr_scheduler.step()
        method.update_target(gate)
        global_step += 1
        progress.advance()
        to_checkpoint = global_step % args.checkpointing_steps == 0 or stop_signal or global_step >= max_train_steps
        to_validate = global_step % args.validation_steps == 0 and not stop_signal
        if global_step % args.logging_steps == 0 or to_checkpoint or to_validate:
            look(global_step)  # before a checkpoint: a run past its non-finite limit stops before saving
        if to_checkpoint:
            checkpoint(global_step)
        if to_validate:
            run_validation(run, teacher, global_step)
        if stop_signal:
            progress.close()
            run.log(f"stopped at step {global_step} (checkpoint-{global_step}); resume with: "
                    f"{resume_command(sys.argv[1:], sys.argv[0])}")
            acc.end_training()
            return 128 + stop_signal
        if global_step >= max_train_steps:
            break
        if to_checkpoint or to_validate:
            window.restart(global_step)  # throughput counts training only, not saving or validating
    progress.close()
    checkpoint(global_step)  # the last step is always resumable, so a run can be extended (already saved: no-op)
    finish(run, teacher, global_step)
    return 0


def skips_on_device(acc, optimizer):
    """Whether the optimizer can skip an update on the device (a fused torch Adam/AdamW reads `found_inf`);
    DeepSpeed steps its own engine."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return (isinstance(inner, torch.optim.Adam) and bool(inner.defaults.get("fused")) and not uses_deepspeed(acc))


def arm_skip(optimizer, gate):
    """Make the next optimizer.step skip on the device when gate is 0. Under fp16 accelerate's GradScaler sets
    found_inf itself (a non-finite loss gives non-finite gradients, which it skips), so it is left alone."""
    if getattr(optimizer, "scaler", None) is None:
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.grad_scale, inner.found_inf = None, 1.0 - gate


class Window:
    """Wall time and optimizer steps since the last look, for samples/s (the looks are where the host has waited
    for the device, so the time between two is the device's too)."""

    def __init__(self, step, samples_per_step):
        self.samples_per_step = samples_per_step
        self.restart(step)

    def restart(self, step):
        self.step, self.start = step, time.perf_counter()

    def samples_per_s(self, step):
        now = time.perf_counter()
        rate = (step - self.step) * self.samples_per_step / max(now - self.start, 1e-9)
        self.step, self.start = step, now
        return rate


def clean_latents(teacher, batch, chunk_size, generator, precomputed=None):
    """z0 [B, C, h, w] of a batch: drawn from the stored posterior of precomputed shards, else VAE-encoded."""
    if "latent_mean" in batch:
        return sample_latents(batch, precomputed["scaling_factor"], chunk_size, generator, generator.device)
    return encode_images(teacher, batch["pixel_values"], chunk_size, generator)


class Progress:
    """A tqdm bar on a terminal, advanced every step, its loss updated at each look; in a log file (stderr not a
    terminal) one plain line at the first look 1/20 of the run (at least 10 steps) after the last, and at the end."""

    def __init__(self, total, initial, enabled):
        from tqdm.auto import tqdm

        self.total, self.enabled, self.printed = total, enabled, initial
        self.every = max(10, total // 20)
        self.bar = tqdm(total=total, initial=initial, desc="steps") if enabled and sys.stderr.isatty() else None

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def show(self, step, loss, lr, samples_per_s):
        """The state at a look: mean loss since the last one, the learning rate, samples/s."""
        status = f"loss={loss:.4g} lr={lr:.2e} samples_s={samples_per_s:.1f}"
        if self.bar is not None:
            self.bar.set_postfix_str(status)
        elif self.enabled and (step - self.printed >= self.every or step == self.total):
            self.printed = step
            print(f"step {step}/{self.total}: {status}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def summary(args, teacher, acc, precomputed=False):
    """The run in a few lines; the full configuration is in training_config.yaml (and printed with --verbose)."""
    data = args.train_shards_path_or_url or args.train_data_dir or args.dataset_name
    if precomputed:
        data += " (precomputed latents and text embeddings)"
    precision = acc.mixed_precision if acc.mixed_precision != "no" else "fp32"
    engine = " (FSDP)" if uses_fsdp(acc) else f" (DeepSpeed ZeRO-{zero_stage(acc)})" if uses_deepspeed(acc) else ""
    return (f"teacher:   {args.pretrained_teacher_model} ({teacher.family.name}, {teacher.prediction_type})\n"
            f"data:      {data}\n"
            f"batch:     {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation x "
            f"{acc.num_processes} process(es){engine}, {args.resolution} px, {precision} on {acc.device.type}\n"
            f"output:    {args.output_dir} (every flag in training_config.yaml)")


def quiet_libraries():
    """Keep library chatter (diffusers' float32-module notes, deprecations) out of a run's output; --verbose keeps it."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # "Loading weights" bars of every component
    transformers_logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", module="huggingface_hub")


def resolve_max_train_steps(args, stream, num_processes):
    if args.max_train_steps is not None:
        return args.max_train_steps
    per_step = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    return args.num_train_epochs * math.ceil(stream.samples_per_epoch / per_step)


def make_optimizer(params, lr, args):
    """AdamW: bitsandbytes' 8-bit one with --use_8bit_adam; else torch's fused kernel where the parameters' device
    has one (CUDA, CPU, XPU, MPS: one kernel for all tensors, and a skipped update decided on the device), else
    the foreach one."""
    settings = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                    eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **settings)
    try:
        return torch.optim.AdamW(params, fused=True, **settings)
    except RuntimeError:  # "fused=True requires all the params to be floating point Tensors of supported devices"
        return torch.optim.AdamW(params, foreach=True, **settings)


def tracker_config(args):
    """Tracker hyperparameters must be scalars: lists become strings, the token is left out."""
    return {k: (str(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()
            if k != "hub_token" and (v is None or isinstance(v, (int, float, str, bool, list, tuple)))}


def gather_skip_counts(acc, stream):
    from accelerate.utils import gather_object

    totals = {}
    for counts in gather_object([dict(stream.skipped)]):
        for reason, n in counts.items():
            totals[f"data/skipped_{reason}"] = totals.get(f"data/skipped_{reason}", 0) + n
    return totals


def save_checkpoint(run, step, optimizer, lr_scheduler, stream, generator):
    """Write checkpoint-<step> via a partial folder; the rename happens only after every rank wrote its part."""
    acc, args = run.accelerator, run.args
    folder = ckpt.partial_path(args.output_dir, step)
    if acc.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    acc.wait_for_everyone()
    weights = run.method.snapshot()
    if acc.is_main_process:
        run.method.save_state(folder, weights)
    del weights
    save_optimizer_state(acc, run.method.student_model, optimizer, folder)
    ckpt.write_json(os.path.join(folder, f"rank_{acc.process_index}.json"),
                    {"rng": ckpt.rng_state(generator), "data": stream.state_dict()})
    acc.wait_for_everyone()
    if acc.is_main_process:
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        ckpt.write_json(os.path.join(folder, ckpt.STATE_FILE),
                        {"global_step": step, "seed": args.seed, "num_processes": acc.num_processes, "run_id": run.run_id,
                         "engine": engine_name(acc),
                         "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler})
        final = ckpt.publish(args.output_dir, step, args.checkpoints_total_limit)
        run.log(f"saved {final}")
    acc.wait_for_everyone()


def resume(run, optimizer, lr_scheduler, stream, generator):
    """Restore everything a checkpoint holds; returns the global step (0 for a new run)."""
    acc, args = run.accelerator, run.args
    path = ckpt.find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        if args.resume_from_checkpoint == "latest":
            run.log(f"no checkpoint in '{args.output_dir}': starting a new run")
        return 0
    state = ckpt.read_json(os.path.join(path, ckpt.STATE_FILE))
    rank_states = [ckpt.read_json(os.path.join(path, f"rank_{r}.json")) for r in range(state["num_processes"])]
    old_workers = rank_states[0]["data"]["num_workers"]
    same_layout = state["num_processes"] == acc.num_processes and old_workers == stream.num_workers
    written_by = checkpoint_engine(state, path)
    if written_by != engine_name(acc) and not (written_by == "DeepSpeed" and uses_deepspeed(acc)):
        raise ConfigError(f"--resume_from_checkpoint: '{path}' was written under {written_by} and this run is under "
                          f"{engine_name(acc)}: the optimizer state has another layout; relaunch with the accelerate "
                          f"config that wrote it")
    if state["num_processes"] != acc.num_processes and uses_deepspeed(acc):
        raise ConfigError(f"--resume_from_checkpoint: '{path}' was written by {state['num_processes']} processes and "
                          f"DeepSpeed keeps one optimizer shard per process; relaunch with that number")
    args.seed = state["seed"]  # a run started without --seed keeps the seed it drew (config, validation)
    run.run_id = state.get("run_id", run.run_id)
    run.method.load_state(path)
    load_optimizer_state(acc, run.method.student_model, optimizer, path)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if acc.scaler is not None and state["scaler"] is not None:
        acc.scaler.load_state_dict(state["scaler"])
    if same_layout:
        ckpt.set_rng_state(rank_states[acc.process_index]["rng"], generator)
        stream.load_state_dict(rank_states[acc.process_index]["data"])
    else:  # elastic: the same global sample position, split between this run's readers
        stream.load_elastic([rank_state["data"] for rank_state in rank_states])
        if acc.process_index < len(rank_states):
            ckpt.set_rng_state(rank_states[acc.process_index]["rng"], generator)
        else:  # a rank the checkpoint did not have: its own noise stream, not one already used at step 0
            generator.manual_seed(args.seed * 1000 + acc.process_index + 7919 * (state["global_step"] + 1))
        run.log(f"elastic resume: {path} was written by {state['num_processes']} process(es) x {old_workers} data "
                f"reader(s), this run has {acc.num_processes} x {stream.num_workers}: it continues from the same "
                f"sample position, but is not bitwise equal to an uninterrupted run")
    run.log(f"resumed from {path} at step {state['global_step']}")
    return state["global_step"]


def teacher_scheduler(teacher, scheduler_cls, **overrides):
    """A scheduler of `scheduler_cls` on the teacher's schedule, with `overrides`."""
    # Only the keys the class takes (SDXL ships an Euler config whose sigma options LCM would warn about), and
    # only those the teacher's file set: the DDPMScheduler that loaded it filled in its own defaults, such as
    # clip_sample=True, which would make sampling clip the latents to [-1, 1].
    config = teacher.noise_scheduler.config
    accepted = set(inspect.signature(scheduler_cls.__init__).parameters) - set(config.get("_use_default_values", ()))
    return scheduler_cls.from_config({k: v for k, v in config.items() if k in accepted}, **overrides)


def lcm_scheduler(teacher, args):
    """The LCMScheduler a user should sample with: the teacher's schedule plus this run's LCM settings."""
    from diffusers import LCMScheduler

    return teacher_scheduler(teacher, LCMScheduler, timestep_scaling=args.timestep_scaling_factor,
                             original_inference_steps=args.num_ddim_timesteps)


def sampling_scheduler(teacher, args):
    """The scheduler a user should sample this run's student with: LCMScheduler for --objective lcm, else
    TCDScheduler (TCD's strategic stochastic sampling; with gamma 0 and --num_phases steps it walks a PCM
    student's phase edges), with the run's DDIM grid."""
    from diffusers import TCDScheduler

    if args.objective == "lcm":
        return lcm_scheduler(teacher, args)
    return teacher_scheduler(teacher, TCDScheduler, original_inference_steps=args.num_ddim_timesteps)


def sampler_usage(args):
    """(scheduler class, extra call arguments as text, a good step count) for the model card's snippet."""
    if args.objective == "lcm":
        return "LCMScheduler", "", 4
    eta = sampling_kwargs(args.objective, args.tcd_gamma)["eta"]
    return "TCDScheduler", f", eta={eta:g}", args.num_phases if args.objective == "pcm" else 4


def export_scheduler(teacher, args, output_dir):
    sampling_scheduler(teacher, args).save_pretrained(os.path.join(output_dir, "scheduler"))


def autocast_for(run):
    """torch's own autocast in the run's low precision: accelerate's does nothing under DeepSpeed, and a pipeline's
    text encoders (low precision) and fresh UNet (fp32) must still meet."""
    return torch.autocast(run.accelerator.device.type, dtype=run.weight_dtype,
                          enabled=run.weight_dtype != torch.float32)


@torch.no_grad()
def teacher_references(run, teacher, prompts, guidance):
    """The teacher's own samples [1, C, h, w] of the validation prompts from the grid's seeds: DDIM with
    REFERENCE_STEPS steps and CFG at `guidance`, on a fresh copy of its UNet (the one in training may be cast or
    carry adapters). Computed once per run: the teacher is frozen."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    args, device = run.args, run.accelerator.device
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_teacher_model, subfolder="unet",
                                                revision=teacher_revision(args), cache_dir=args.cache_dir)
    pipe = teacher.pipeline(unet.to(device).eval(), teacher_scheduler(teacher, DDIMScheduler))
    references = []
    for i, prompt in enumerate(prompts):
        with autocast_for(run):
            references.append(pipe(prompt, num_inference_steps=REFERENCE_STEPS, guidance_scale=guidance,
                                   height=args.resolution, width=args.resolution, output_type="latent",
                                   generator=torch.Generator(device="cpu").manual_seed(args.seed + i)).images.float())
    return references


@torch.no_grad()
def run_validation(run, teacher, step):
    """Sample the validation prompts at each LCM step count from fixed seeds; save and log one PNG grid, and the
    latent RMS distance of each sample to the teacher's own sample of the same prompt and noise (per step count,
    the mean over prompts: how close the few-step student lands to where the teacher's sampler ends)."""
    acc, args = run.accelerator, run.args
    weights = run.method.snapshot(student_only=True)
    if acc.is_main_process:
        prompts = args.validation_prompts or DEFAULT_VALIDATION_PROMPTS
        guidance = args.validation_guidance_scale
        if guidance is None:
            guidance = run.method.default_validation_guidance(args)
        distances = {n: [] for n in args.validation_inference_steps}
        sampler = sampling_kwargs(args.objective, args.tcd_gamma)
        with tempfile.TemporaryDirectory(dir=args.output_dir, prefix=".validation-") as tmp, \
                teacher.encoders_on(acc.device):
            if getattr(run, "references", None) is None:
                run.references = teacher_references(run, teacher, prompts, run.method.reference_guidance(args))
            pipe = run.method.validation_pipeline(tmp, teacher, args, acc.device, weights)
            del weights
            rows, columns = [], [f"{n} step{'s' if n > 1 else ''}, g {guidance:g}"
                                 for n in args.validation_inference_steps]
            for i, prompt in enumerate(prompts):
                row = []
                for steps in args.validation_inference_steps:
                    gen = torch.Generator(device="cpu").manual_seed(args.seed + i)
                    with autocast_for(run):
                        latents = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                                       height=args.resolution, width=args.resolution, generator=gen,
                                       output_type="latent", **sampler).images
                    distances[steps].append((latents.float() - run.references[i]).square().mean().sqrt().item())
                    # Decoded outside autocast, in the VAE's own dtype: SDXL's VAE overflows in fp16.
                    row.append((decode_to_array(pipe, latents)[0] * 255).round().astype(np.uint8))
                rows.append(row)
            del pipe
        grid = np.asarray(labelled_grid(rows, prompts, columns))
        save_grid(grid, os.path.join(args.output_dir, "validation", f"step-{step:06d}.png"))
        log_grid(acc, grid, step)
        metrics = {n: float(np.mean(d)) for n, d in distances.items()}
        acc.log({f"validation/teacher_rmse_{n}_steps": value for n, value in metrics.items()}, step=step)
        record_validation_metrics(args.output_dir, step, metrics, guidance, run.method.reference_guidance(args))
    acc.wait_for_everyone()


def record_validation_metrics(output_dir, step, metrics, guidance, reference_guidance):
    """Append this validation's metrics to validation/metrics.jsonl (the model card shows the last line)."""
    line = {"step": step, "guidance_scale": guidance, "reference": f"teacher DDIM {REFERENCE_STEPS} steps, "
            f"guidance {reference_guidance:g}", "teacher_rmse": {str(n): v for n, v in metrics.items()}}
    with open(os.path.join(output_dir, "validation", METRICS_FILE), "a") as f:
        f.write(json.dumps(line) + "\n")


def last_validation_metrics(output_dir):
    """The last line of validation/metrics.jsonl, or None."""
    try:
        with open(os.path.join(output_dir, "validation", METRICS_FILE)) as f:
            lines = [line for line in f if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def stock_pipeline(teacher, unet, args):
    """The teacher family's stock pipeline (SD or SDXL) from the loaded teacher parts, the given UNet and this
    run's sampling scheduler."""
    return teacher.pipeline(unet, sampling_scheduler(teacher, args))


def save_grid(grid, path):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)


def log_grid(acc, grid, step):
    """The validation grid [H, W, 3] uint8 to every tracker that takes images. tensorboard and wandb are tested;
    the others follow accelerate's and their own APIs, and a failure there is a warning, not a stopped run."""
    for tracker in acc.trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", grid, step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": wandb.Image(grid)}, step=step)
            elif tracker.name == "aim":
                tracker.log_images({"validation": grid}, step=step)
            elif tracker.name in ("clearml", "swanlab"):
                tracker.log_images({"validation": [grid]}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_image(grid, f"validation/step-{step:06d}.png")
            elif tracker.name == "comet_ml":
                tracker.tracker.log_image(grid, name="validation", step=step)
        except Exception as e:  # an optional tracker's API drift must not end a long run
            print(f"warning: the validation grid was not logged to {tracker.name} ({type(e).__name__}: {e})",
                  file=sys.stderr)


def finish(run, teacher, step):
    """Export the weights of `step` (scheduler, weights, model card, then exported.json), unless output_dir already
    holds this run's export of this step or a later one: a rerun past the end leaves the export untouched, and
    older weights never replace newer ones. A new run (no resume) in the same folder exports its own. With
    --push_to_hub the upload is recorded too, so a rerun retries one that failed."""
    acc, args = run.accelerator, run.args
    acc.wait_for_everyone()
    weights = run.method.snapshot()
    if acc.is_main_process:
        record = os.path.join(args.output_dir, EXPORT_STATE)
        previous = read_export_state(args.output_dir)
        if previous.get("run_id") == run.run_id and previous.get("step", -1) >= step:
            run.log(f"{args.output_dir} already holds this run's export of step {previous['step']}; left as it is "
                    f"(delete {EXPORT_STATE} there to export step {step} again)")
            state = previous
        else:
            export_scheduler(teacher, args, args.output_dir)
            usage = run.method.export(args.output_dir, weights)
            write_model_card(args, usage, step, run.method, teacher.family)
            # Written last: an export cut short by a kill has no record, and the next run writes it again.
            state = {"step": step, "run_id": run.run_id, "uploaded": False}
            ckpt.write_json(record, state)
            run.log(f"saved the distilled model (step {step}) to {args.output_dir}")
        if run.repo_id and not state.get("uploaded"):
            from huggingface_hub import upload_folder

            upload_folder(repo_id=run.repo_id, folder_path=args.output_dir, token=args.hub_token,
                          ignore_patterns=["checkpoint-*", "*.partial", "logs/*"])
            ckpt.write_json(record, dict(state, uploaded=True))
    acc.end_training()


def read_export_state(output_dir):
    path = os.path.join(output_dir, EXPORT_STATE)
    try:
        return ckpt.read_json(path)
    except (OSError, ValueError):
        return {}


def create_hub_repo(args):
    """The repo id, or a ConfigError saying why it could not be created (offline, no token, no rights)."""
    try:
        from huggingface_hub import create_repo

        return create_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                           exist_ok=True, token=args.hub_token, private=True).repo_id
    except Exception as e:  # say so before training, not after
        return ConfigError(f"--push_to_hub: cannot create the Hub repo ({type(e).__name__}: {str(e)[:200]}); "
                           f"log in with `hf auth login` or drop --push_to_hub")


def pretrained_parts(args):
    """from_pretrained arguments of the model card's snippet: the teacher, and the VAE the run used if not its own."""
    parts = f'"{args.pretrained_teacher_model}"'
    if args.pretrained_vae_model_name_or_path:
        parts += f', vae=AutoencoderKL.from_pretrained("{args.pretrained_vae_model_name_or_path}")'
    return parts


def vae_import(args):
    return "AutoencoderKL, " if args.pretrained_vae_model_name_or_path else ""


OBJECTIVE_NAMES = {"lcm": "latent consistency distillation (LCM)",
                   "tcd": "trajectory consistency distillation (TCD, arXiv 2402.19159)",
                   "pcm": "phased consistency distillation (PCM, arXiv 2405.18407)"}


def sampling_note(args):
    """How to sample, per objective, for the model card."""
    if args.objective == "lcm":
        return ("Sample with 1-8 steps and the `LCMScheduler` saved in `scheduler/` (its `timestep_scaling` and "
                "`original_inference_steps` match this training run).")
    if args.objective == "tcd":
        return (f"Sample with 2-8 steps and the `TCDScheduler` saved in `scheduler/`, passing its gamma as `eta` "
                f"({args.tcd_gamma:g} in training's validation; 0 is deterministic, higher adds detail-refreshing "
                f"noise at each step).")
    return (f"Sample with {args.num_phases} steps (its {args.num_phases} phases) and the `TCDScheduler` saved in "
            f"`scheduler/` with `eta=0`: each step then maps one phase edge to the next along the teacher's ODE.")


def write_model_card(args, usage, step, method, family):
    """README.md with the Hub's model-card metadata (library, base model, tags, pipeline), the usage, and the
    newest validation grid."""
    import yaml

    lora = "lora" in method.name.lower()
    tags = (["lcm", "latent-consistency-distillation"] + ([args.objective] if args.objective != "lcm" else [])
            + ["text-to-image", "stable-diffusion-xl" if family.name == "SDXL" else "stable-diffusion"]
            + (["lora", "lcm-lora"] if lora else []))
    metadata = {"library_name": "diffusers", "tags": tags, "pipeline_tag": "text-to-image", "inference": True}
    if HUB_ID.match(args.pretrained_teacher_model) and not os.path.isdir(args.pretrained_teacher_model):
        metadata["base_model"] = args.pretrained_teacher_model  # the Hub wants an id here, never a local path
    grids = sorted(glob.glob(os.path.join(args.output_dir, "validation", "step-*.png")))
    grid = (f"\n![validation grid at step {int(os.path.basename(grids[-1])[5:-4])}: one row per prompt, one column "
            f"per LCM step count](validation/{os.path.basename(grids[-1])})\n") if grids else ""
    metrics = last_validation_metrics(args.output_dir)
    if metrics:
        distances = metrics["teacher_rmse"]
        header, values = " | ".join(distances), " | ".join(f"{v:.4f}" for v in distances.values())
        grid += (f"\nAt the last validation (step {metrics['step']}, guidance_scale {metrics['guidance_scale']:g}), "
                 f"the latent RMS distance of each sample to the {metrics['reference']} sample of the same prompt "
                 f"and noise, averaged over the validation prompts (lower is closer to the teacher):\n\n"
                 f"| LCM steps | {header} |\n| --- |{' ---: |' * len(distances)}\n| distance | {values} |\n")
    text = f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {args.objective.upper()}{"-LoRA" if lora else "-distilled"} {family.name} model

Distilled from `{args.pretrained_teacher_model}` by {OBJECTIVE_NAMES[args.objective]} for {step} steps
(w ~ U[{args.w_min}, {args.w_max}], N = {args.num_ddim_timesteps} DDIM steps, {args.loss_type} loss).
{grid}
{usage}

{sampling_note(args)}

The resolved training configuration is in `training_config.yaml`.
"""
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write(text)
