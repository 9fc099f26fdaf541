"""What a user is told when something is wrong: the error types and the one error line.

Every error a user can fix is one line naming the flag or file and the fix (exit status 2); a run that cannot go
on is one line too (exit status 1). The lowest layer: it imports nothing of lcm_utils.
"""

import os
import sys
import time

REPORT_GRACE_S = 5  # how long other ranks wait after an error that rank 0 reports


class ConfigError(ValueError):
    """A bad flag, flag combination or path; the message is one line naming the flag and the fix."""


class DataError(ValueError):
    """A data problem the user can fix; the message names the flag or file and the fix."""


class ReaderError(DataError):
    """A DataError one rank's reader found (its share is empty or all bad): only that rank knows it."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); one line, exit status 1, checkpoints kept."""


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
