"""What a user sees on the console besides errors: one progress display for every long job, and library chatter
kept out."""

import sys


class ProgressDisplay:
    """A tqdm bar when stderr is a terminal, else plain lines a log file keeps; nothing when not `enabled` (the
    other ranks)."""

    def __init__(self, total, initial=0, desc="steps", unit="it", enabled=True):
        from tqdm.auto import tqdm

        self.total, self.enabled = total, enabled
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit) if enabled and sys.stderr.isatty() \
            else None

    def advance(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def status(self, text):
        """The bar's postfix; a log file gets nothing (subclasses say when it gets a line)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def line(self, text):
        """A plain line, in a log file only (a terminal has the bar)."""
        if self.bar is None and self.enabled:
            print(text, flush=True)

    def say(self, text):
        """A line for terminals and log files alike, printed above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def quiet_libraries():
    """Keep library chatter (diffusers' float32-module notes, deprecations, Hub retries) out of a run's output;
    --verbose keeps it."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # its "Retrying in 4s" lines while the Hub cannot be reached
    diffusers_logging.disable_progress_bar()  # "Loading weights" bars of every component
    transformers_logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", module="huggingface_hub")
