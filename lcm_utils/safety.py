"""Never lose work: stop signals turned into a checkpoint at the next step boundary, agreement between ranks,
and the bookkeeping that keeps a non-finite loss away from the weights.

A preemptible or SLURM job gets SIGTERM (or SIGUSR1) some seconds before it is killed, and a user presses
Ctrl-C. The first such signal only sets a flag: every rank finishes its optimizer step, the ranks agree (one
tiny all-reduce of host data per step), and the loop writes a checkpoint and stops. A second signal stops at
once; the checkpoints on disk are complete or absent, never half-written.
"""

import os
import signal
import sys
import time

import torch

from .errors import TrainingError

# A launcher that got the signal too (torchrun, a whole process group, a cgroup kill) passes it on: the same
# signal again this soon is that copy, not a second request.
REPEAT_WINDOW_S = 0.5


def parse_stop_signals(text):
    """'SIGINT,SIGTERM' -> [signal.SIGINT, signal.SIGTERM]; 'none' -> []. ValueError names a bad entry."""
    if text.strip().lower() == "none":
        return []
    found = []
    for name in (part.strip().upper() for part in text.split(",") if part.strip()):
        name = name if name.startswith("SIG") else "SIG" + name
        if name in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, name, None), signal.Signals):
            raise ValueError(name)
        found.append(getattr(signal, name))
    return found


class StopSignals:
    """Installs handlers for the given signals; `.received` is the first one caught (None until then)."""

    def __init__(self, signals, log=print):
        self.received, self.when = None, 0.0
        self.log = log
        self.previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received is not None:
            if signum == self.received and now - self.when < REPEAT_WINDOW_S:
                return  # the launcher's copy of the same signal
            if signum == signal.SIGINT:  # a second Ctrl-C: the user wants out now
                # Checkpoints are written to a partial folder and renamed when complete: stopping mid-save is safe.
                print(f"{name} again: stopping now without a new checkpoint (the last complete one is intact)",
                      file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.log(f"{name} received while stopping: the checkpoint of this step is on its way")
            return
        self.received, self.when = signum, now
        self.log(f"{name} received: finishing this step and writing a checkpoint (Ctrl-C again stops at once)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class StopAgreement:
    """Whether any rank caught a stop signal, agreed at every optimizer step over a CPU (gloo) group: the flag is
    host data, so agreeing on it never waits for the device."""

    def __init__(self, accelerator):
        self.group = None
        if accelerator.num_processes > 1:
            self.group = torch.distributed.new_group(backend="gloo")

    def __call__(self, signum):
        """The stop signal any rank caught (0 if none)."""
        if self.group is None:
            return signum or 0
        flag = torch.tensor([float(signum or 0)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(flag.item())


# What a stop may take before the launcher kills the run: accelerate's single-process launcher terminates the script
# and kills it 5 s later (accelerate 1.x, _terminate_process_tree); torchrun's agent waits --shutdown_timeout.
SIMPLE_LAUNCHER_GRACE_S = 5.0
TORCHRUN_DEFAULT_GRACE_S = 30.0
# A start-up estimate of the save speed, until a real save is timed: the first save of a process is the slow one,
# 0.51 GB/s for a full SD 1.5 checkpoint on this project's machine (benchmarks/save_time.py; 1.2 GB/s after it).
ASSUMED_WRITE_GB_S = 0.5


def launch_path():
    """(how this process was started, seconds a stop gets before the launcher kills it; None when the launcher sets
    no limit: a plain `python train_*.py`, where only the job system's grace period counts)."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # set by torchrun's agent: accelerate launch --multi_gpu, torchrun
        return "torchrun", float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TORCHRUN_DEFAULT_GRACE_S))
    try:
        import psutil  # accelerate's own dependency

        parent = " ".join(psutil.Process(os.getppid()).cmdline())
    except Exception:  # no psutil, or the parent is gone: no launcher to read
        return "python", None
    if "accelerate" in parent and "launch" in parent:
        return "accelerate launch", SIMPLE_LAUNCHER_GRACE_S
    return "python", None


def stop_grace_warning(launcher, grace_s, checkpoint_bytes, save_s=None):
    """A one-line warning when a checkpoint takes longer to write (timed, or estimated from its size) than the
    launcher lets a stop run before its kill; None when it fits."""
    if grace_s is None:
        return None
    estimated = save_s is None
    if estimated:
        save_s = checkpoint_bytes / (ASSUMED_WRITE_GB_S * 1e9)
    if save_s <= grace_s:
        return None
    took = (f"is about {checkpoint_bytes / 1e9:.1f} GB (about {save_s:.0f} s to write at {ASSUMED_WRITE_GB_S:g} GB/s)"
            if estimated else f"took {save_s:.1f} s to write")
    if launcher == "torchrun":
        fix = (f"raise TORCH_ELASTIC_SHUTDOWN_TIMEOUT (now {grace_s:g}) to at least {2 * save_s + 10:.0f} in the "
               f"launch environment")
    else:
        fix = ("start a single-process run with `python train_*.py ...` instead (no launcher between the signal and "
               "the run)")
    return (f"warning: this run's checkpoint {took} and {launcher} gives a stop {grace_s:g} s before it kills the "
            f"run, so a Ctrl-C or SIGTERM would lose the steps since the last checkpoint; {fix} "
            f"(docs/stopping-and-resume.md)")


def resume_command(argv, script, launcher="accelerate launch"):
    """The command line that continues this run: its flags with --resume_from_checkpoint latest."""
    import shlex

    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--resume_from_checkpoint":
            skip_value = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(shlex.quote(arg))
    return " ".join([launcher if launcher == "python" else "accelerate launch", shlex.quote(script), *kept,
                     "--resume_from_checkpoint latest"])


class StepHealth:
    """The losses since the host last looked, kept on the device: their mean for the log, and the non-finite ones.
    A non-finite loss on any rank skips that optimizer step's update on every rank (weights, optimizer state, EMA
    target), and the step still counts, as a GradScaler's skipped step does. With a fused optimizer the skip is
    decided on the device (its found_inf input), so the host reads these numbers only when it looks: every
    --logging_steps, and before a checkpoint, a validation or the end. Without one (8-bit Adam, DeepSpeed) it
    looks at every step."""

    def __init__(self, limit, device, on_device):
        self.limit, self.on_device = limit, on_device
        self.window_finite = torch.ones((), dtype=torch.bool, device=device)  # this step's micro-batches
        # loss sum, finite losses, skipped steps in all, skipped in a row, step at which the limit was reached
        self.numbers = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0], device=device)
        self.skipped_seen, self.looked_at = 0, 0

    def observe(self, loss, also=None):
        """A micro-batch's loss []: into the window's flag and the log's mean (finite losses only). `also`: other
        losses of the step (the adversarial term's) that must be finite too, not logged here."""
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        self.window_finite &= finite if also is None else finite & torch.isfinite(also.detach().float())
        self.numbers[0] += torch.where(finite, loss, 0.0)
        self.numbers[1] += finite.float()

    def gate(self, accelerator, step):
        """1. when every rank's losses of optimizer step `step` were finite, else 0. (a device scalar); counts it."""
        finite = self.window_finite.float()
        if accelerator.num_processes > 1:  # queued on the device's stream like the gradient all-reduce: no wait
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        self.window_finite.fill_(True)
        bad = 1.0 - finite
        self.numbers[2] += bad
        self.numbers[3] = (self.numbers[3] + 1.0) * bad
        reached = (self.numbers[3] >= self.limit) & (self.numbers[4] < 0)
        self.numbers[4] = torch.where(reached, float(step), self.numbers[4])
        return finite

    def look(self, step, last_checkpoint, log):
        """Read the numbers (one device sync): the mean finite loss since the last look (nan if none); logs the
        skipped updates; TrainingError once --max_nonfinite_steps in a row were reached, naming that step."""
        loss_sum, count, skipped, in_a_row, reached = self.numbers.tolist()
        self.numbers[:2] = 0.0
        new, first = int(skipped) - self.skipped_seen, self.looked_at + 1
        self.skipped_seen, self.looked_at = int(skipped), step
        if new:
            where = f"step {step}" if first == step else f"steps {first}-{step}"
            log(f"{where}: {new} non-finite loss{'es' if new > 1 else ''}, update{'s' if new > 1 else ''} skipped "
                f"({int(in_a_row)} in a row now)")
        if reached >= 0:
            kept = f"the last checkpoint, {last_checkpoint}, is kept" if last_checkpoint else "no checkpoint was written"
            raise TrainingError(
                f"the loss was not finite for {self.limit} steps in a row (step {int(reached)}, "
                f"--max_nonfinite_steps {self.limit}); stopped, {kept}; lower --learning_rate, check the data, "
                f"or use bf16/fp32 instead of fp16")
        return loss_sum / count if count else float("nan"), int(skipped)
