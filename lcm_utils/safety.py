"""Never lose work: stop signals turned into a checkpoint at the next step boundary, agreement between ranks,
and the guard that keeps a non-finite loss away from the weights.

A preemptible or SLURM job gets SIGTERM (or SIGUSR1) some seconds before it is killed, and a user presses
Ctrl-C. The first such signal only sets a flag: every rank finishes its optimizer step, the ranks agree (one
tiny all-reduce per step, together with the non-finite flag), and the loop writes a checkpoint and stops. A
second signal stops at once; the checkpoints on disk are complete or absent, never half-written.
"""

import os
import signal
import sys
import time

import torch

# A launcher that got the signal too (torchrun, a whole process group, a cgroup kill) passes it on: the same
# signal again this soon is that copy, not a second request.
REPEAT_WINDOW_S = 0.5


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); one line, exit status 1, checkpoints kept."""


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


def agree(accelerator, signum, nonfinite):
    """(the stop signal any rank caught, 0 if none; any rank's loss was non-finite): one all-reduce when there
    are several ranks, so every rank skips the same updates and stops at the same step."""
    if accelerator.num_processes == 1:
        return signum, nonfinite
    flags = torch.tensor([float(signum), float(nonfinite)], device=accelerator.device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return int(flags[0].item()), bool(flags[1].item())


def resume_command(argv, script):
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
    return " ".join(["accelerate launch", shlex.quote(script), *kept, "--resume_from_checkpoint latest"])


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss; raises TrainingError after `limit` in a row."""

    def __init__(self, limit):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def skipped(self, step, last_checkpoint):
        """Record a skipped update at optimizer step `step` (the one that did not happen)."""
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            kept = f"the last checkpoint, {last_checkpoint}, is kept" if last_checkpoint else "no checkpoint was written"
            raise TrainingError(
                f"the loss was not finite for {self.in_a_row} steps in a row (step {step}, "
                f"--max_nonfinite_steps {self.limit}); stopped, {kept}; lower --learning_rate, check the data, "
                f"or use bf16/fp32 instead of fp16")

    def passed(self):
        self.in_a_row = 0
