"""Exit codes and the one-line error every user mistake turns into.

A distributed job that dies with a 40-line traceback after the process group is
up wastes minutes and hides the cause. Everything a user can get wrong raises
`UserError` early; the entry points print its one line and exit with its code.
"""

import sys
from typing import NoReturn

EXIT_OK = 0
EXIT_CRASH = 1  # an unexpected exception (the traceback is shown)
EXIT_USAGE = 2  # bad config, bad input, bad environment: one line, nothing written
EXIT_NONFINITE = 3  # loss became NaN/inf; the last good checkpoint is kept
EXIT_PEER_FAILED = 4  # another rank died; this one stopped without a cascade
EXIT_HANG = 5  # a collective timed out (a rank missing, or ranks calling different collectives); see launch.processes.hangs
EXIT_STOPPED = 75  # stopped by a signal or stop file after saving a checkpoint (EX_TEMPFAIL: rerun to resume)


class UserError(Exception):
    """A problem the user can fix; printed as one line, never as a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
