"""The training loop both scripts share, top to bottom: data, models, optimizer, resume, then the steps.

The host waits for the device only at a look (every --logging_steps, and before a checkpoint, a validation or the
end); everything between two looks is queued work.
"""

import sys
import time
from dataclasses import dataclass

import torch

from .. import checkpoint as ckpt
from ..config import save_resolved_config
from ..console import ProgressDisplay, quiet_libraries
from ..data import DataSpec, TrainStream, data_report, latents_from_posterior, tracker_name
from ..engines import check_engine_support, configure_deepspeed, fit_fsdp_wrap, uses_deepspeed, uses_fsdp
from ..errors import TrainingError
from ..families import encode_images, teacher_family
from ..consistency import LOSSES
from ..objectives import consistency_pair
from ..precompute import check_precomputed
from ..safety import StepHealth, StopAgreement, StopSignals, parse_stop_signals, resume_command
from .checkpointing import resume, save_checkpoint
from .export import finish
from .setup import (Run, build_adversary, build_models, learning_rate, make_optimizer, resolve_max_train_steps,
                    skips_on_device, summary, tracker_config, warn_if_a_stop_cannot_save)
from .validation import run_validation

DROPPED_WARNING = 0.05  # a share of dropped samples worth a warning: the data is not what the user thinks


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


@dataclass
class Training:
    """The stateful parts of the loop, and where it stands."""

    stream: object
    params: list  # what gradient clipping takes
    optimizer: object
    lr_scheduler: object
    schedule: object  # the objectives' SolverSchedule
    generator: torch.Generator
    max_train_steps: int
    step: int = 0
    saved_step: int = None  # the step of the newest complete checkpoint
    data_said: dict = None  # the skip counts last printed (None before the first gather)
    warned: bool = False  # whether the dropped share was warned about
    adversary: object = None  # the adversarial term's discriminator and its optimizer (--adv_weight > 0)


def train_loop(run, stop):
    args, method, acc = run.args, run.method, run.accelerator
    device = acc.device
    # The data first: a dataset column or source error is reported before minutes of model loading.
    family_cls = teacher_family(args)
    stream = TrainStream(DataSpec.from_flags(args, args.seed, family_cls.uses_original_size), acc.process_index,
                         acc.num_processes)
    if stream.precomputed:
        for note in check_precomputed(stream.precomputed, args, family_cls):
            run.log(f"note: {note}")
    check_engine_support(acc)
    method.check_engine(args, acc)
    teacher = build_models(run, stream)
    objective = method.objective

    state = prepare(run, teacher, stream)
    if acc.is_main_process:
        text = save_resolved_config(args, args.output_dir)
        run.log(text if args.verbose else summary(args, teacher, acc, bool(stream.precomputed)))
        acc.init_trackers(args.tracker_project_name, config=tracker_config(args))
    warn_if_a_stop_cannot_save(run)
    generator, max_train_steps, adversary = state.generator, state.max_train_steps, state.adversary
    if state.step >= max_train_steps:
        run.log(f"the checkpoint is at step {state.step}, --max_train_steps is {max_train_steps}: nothing to train")
        finish(run, teacher, state.step)
        return 0
    adversarial = f" and an adversarial term (weight {args.adv_weight:g}, real: {args.adv_real}, fake: " \
        f"{args.adv_fake}, times: {args.adv_timesteps})" if adversary else ""
    run.log(f"training {method.name}{objective.announcement}{adversarial}: {max_train_steps} steps, "
            f"{acc.num_processes} process(es), batch {args.train_batch_size} x accumulation "
            f"{args.gradient_accumulation_steps}, from step {state.step}")

    progress = Progress(max_train_steps, state.step, acc.is_main_process)
    health = StepHealth(args.max_nonfinite_steps, device, skips_on_device(acc, state.optimizer))
    agree_stop = StopAgreement(acc)
    window = Window(state.step, args.train_batch_size * args.gradient_accumulation_steps * acc.num_processes)

    for batch in stream:
        with acc.accumulate(method.student_model):
            z0 = clean_latents(teacher, batch, args.vae_encode_batch_size, generator, stream.precomputed)
            if args.channels_last:
                z0 = z0.contiguous(memory_format=torch.channels_last)
            cond, uncond = teacher.family.conditions(batch, args.resolution, args.use_fix_crop_and_size)
            w = args.w_min + (args.w_max - args.w_min) * torch.rand(
                z0.shape[0], generator=generator, device=generator.device)
            with acc.autocast():
                pair = consistency_pair(z0, cond, uncond, w.to(device), method.student_forward, method.teacher_forward,
                                        method.target_forward, state.schedule, generator, objective)
                loss = LOSSES[args.loss_type](pair.pred.float(), pair.target.float(), args.huber_c)
                if adversary:  # (weight * the generator's hinge, the heads' own loss)
                    g_term, d_loss = adversary.terms(pair, z0, cond, state.schedule, objective, generator)
            acc.backward(loss + g_term if adversary else loss)
            health.observe(loss, also=g_term + d_loss if adversary else None)
            if adversary:
                adversary.backward(d_loss, args.gradient_accumulation_steps)
            if acc.sync_gradients:
                # 1 when every rank's losses of this step were finite: else no update anywhere (weights,
                # optimizer state, EMA target), decided on the device where the optimizer can skip by itself.
                gate = health.gate(acc, state.step + 1)
                update(run, state, gate, health.on_device)
        if not acc.sync_gradients:
            continue
        stop_signal = agree_stop(stop.received)  # host data only: no wait for the device
        state.lr_scheduler.step()
        method.update_target(gate)
        state.step += 1
        progress.advance()
        to_checkpoint = state.step % args.checkpointing_steps == 0 or stop_signal or state.step >= max_train_steps
        to_validate = state.step % args.validation_steps == 0 and not stop_signal
        if state.step % args.logging_steps == 0 or to_checkpoint or to_validate:
            look(run, state, health, progress, window)  # before a checkpoint: a run past its limit stops unsaved
        if to_checkpoint:
            checkpoint(run, state)
        if to_validate:
            run_validation(run, teacher, state.step)
        if stop_signal:
            say_data(run, state, progress, state.data_said)
            progress.close()
            run.log(f"stopped at step {state.step} (checkpoint-{state.step}); resume with: "
                    f"{resume_command(sys.argv[1:], sys.argv[0], run.launcher)}")
            acc.end_training()
            return 128 + stop_signal
        if state.step >= max_train_steps:
            break
        if to_checkpoint or to_validate:
            window.restart(state.step)  # throughput counts training only, not saving or validating
    say_data(run, state, progress, state.data_said)
    progress.close()
    checkpoint(run, state)  # the last step is always resumable, so a run can be extended (already saved: no-op)
    finish(run, teacher, state.step)
    return 0


def prepare(run, teacher, stream):
    """The optimizer and its schedule, the engine around the student, the solver grid and the noise generator,
    restored from the checkpoint to resume from (if any)."""
    args, method, acc = run.args, run.method, run.accelerator
    device = acc.device
    params = method.trainable_parameters()
    optimizer = make_optimizer(params, learning_rate(args, acc.num_processes), args)
    max_train_steps = resolve_max_train_steps(args, stream, acc.num_processes)
    from diffusers.optimization import get_scheduler

    # Not passed to accelerator.prepare: stepped once per optimizer step whatever the number of processes.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_train_steps)
    if uses_deepspeed(acc):
        configure_deepspeed(acc, args)
    fit_fsdp_wrap(acc, method.student)
    method.student_model, optimizer = acc.prepare(method.student, optimizer)
    if uses_fsdp(acc):
        method.shard()
        # FSDP replaced the parameters by their shards. Clipping takes the whole model's: accelerate clips those
        # in one pass (frozen ones have no gradient), and unscales fp16 gradients twice for a subset.
        params = list(method.student_model.parameters())
    schedule = teacher.solver_schedule(args.num_ddim_timesteps, args.timestep_scaling_factor, device)
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + acc.process_index)
    adversary = build_adversary(run, teacher)
    step = resume(run, optimizer, lr_scheduler, stream, generator, adversary)
    return Training(stream, params, optimizer, lr_scheduler, schedule, generator, max_train_steps, step,
                    saved_step=step if step else None, adversary=adversary)


def update(run, state, gate, on_device):
    """The optimizer step of the student and of the discriminator heads, skipped on every rank when gate is 0."""
    args, adversary = run.args, state.adversary
    optimizers = [state.optimizer] + ([adversary.optimizer] if adversary else [])
    if on_device:
        for optimizer in optimizers:
            arm_skip(optimizer, gate)
    if on_device or bool(gate):
        if args.max_grad_norm > 0:
            run.accelerator.clip_grad_norm_(state.params, args.max_grad_norm)
        state.optimizer.step()
        if adversary:
            adversary.step(args.max_grad_norm)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)


def checkpoint(run, state):
    """Save the current step, unless its checkpoint is already written."""
    if state.saved_step != state.step:
        start = time.perf_counter()
        save_checkpoint(run, state.step, state.optimizer, state.lr_scheduler, state.stream, state.generator,
                        state.adversary)
        state.saved_step = state.step
        warn_if_a_stop_cannot_save(run, time.perf_counter() - start)


def look(run, state, health, progress, window):
    """The host's read of the device (its only wait for it): log the steps since the last look."""
    acc, step = run.accelerator, state.step
    last_checkpoint = state.saved_step and ckpt.final_path(run.args.output_dir, state.saved_step)
    try:
        loss, skipped = health.look(step, last_checkpoint, run.log)
    except TrainingError:
        progress.close()  # the error line starts on a line of its own
        raise
    logs = {"train/loss": loss, "train/lr": state.lr_scheduler.get_last_lr()[0],
            "train/samples_per_s": window.samples_per_s(step), "train/nonfinite_skipped": skipped}
    counts = gather_skip_counts(acc, state.stream)  # a few small dicts, once per look
    logs.update({tracker_name(reason): n for reason, n in counts.items()})
    adversarial = state.adversary.look() if state.adversary else {}
    logs.update(adversarial)
    if counts != (state.data_said or {}) and step != state.max_train_steps:  # the end says it anyway
        say_data(run, state, progress, counts)
    state.data_said = counts
    progress.show(step, loss, logs["train/lr"], logs["train/samples_per_s"],
                  " ".join(f"{name[4:]}={value:.3g}" for name, value in adversarial.items()))
    acc.log(logs, step=step)


def clean_latents(teacher, batch, chunk_size, generator, precomputed=None):
    """z0 [B, C, h, w] of a batch: drawn from the stored posterior of precomputed shards, else VAE-encoded."""
    if "latent_mean" in batch:
        return latents_from_posterior(batch, precomputed["scaling_factor"], chunk_size, generator, generator.device,
                                      precomputed.get("shift_factor"))
    return encode_images(teacher, batch["pixel_values"], chunk_size, generator)


def arm_skip(optimizer, gate):
    """Make the next optimizer.step skip on the device when gate is 0. Under fp16 accelerate's GradScaler sets
    found_inf itself (a non-finite loss gives non-finite gradients, which it skips), so it is left alone."""
    if getattr(optimizer, "scaler", None) is None:
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.grad_scale, inner.found_inf = None, 1.0 - gate


def gather_skip_counts(acc, stream):
    """Every rank's skip, filter and repair counts summed, by reason."""
    from accelerate.utils import gather_object

    totals = {}
    for counts in gather_object([dict(stream.skipped)]):
        for reason, n in counts.items():
            totals[reason] = totals.get(reason, 0) + n
    return dict(sorted(totals.items()))


def say_data(run, state, progress, counts):
    """Print what the data lost so far (by reason: broken, filtered, repaired), and warn once when more than
    DROPPED_WARNING of the samples read were dropped."""
    if not counts or not run.accelerator.is_main_process:
        return
    args = run.args
    used = state.step * args.train_batch_size * args.gradient_accumulation_steps * run.accelerator.num_processes
    line, share, filters = data_report(counts, used)
    progress.say(line)
    if share > DROPPED_WARNING and not state.warned:
        state.warned = True
        fix = f"loosen {' / '.join(filters)} or " if filters else ""
        progress.say(f"warning: {share:.0%} of the samples read were dropped (more than {DROPPED_WARNING:.0%}): "
                     f"{fix}check the data; the counts by reason are above")


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


class Progress(ProgressDisplay):
    """The steps: the bar advanced every step, its loss updated at each look; in a log file one plain line at the
    first look 1/20 of the run (at least 10 steps) after the last, and at the end."""

    def __init__(self, total, initial, enabled):
        super().__init__(total, initial, desc="steps", enabled=enabled)
        self.printed, self.every = initial, max(10, total // 20)

    def show(self, step, loss, lr, samples_per_s, more=""):
        """The state at a look: mean loss since the last one, the learning rate, samples/s (and `more`)."""
        status = f"loss={loss:.4g} lr={lr:.2e} samples_s={samples_per_s:.1f}" + (f" {more}" if more else "")
        self.status(status)
        if self.bar is None and self.enabled and (step - self.printed >= self.every or step == self.total):
            self.printed = step
            self.line(f"step {step}/{self.total}: {status}")
