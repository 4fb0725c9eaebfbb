"""Errors a user can cause and fix.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2 (the traceback
only with ``--debug``). Raise it wherever bad input is detected, with a message that names
the problem and the fix (the valid choices, the bad key).
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""


def error_line(text: str) -> None:
    """Write ``text`` and its newline to stderr in one write: the error lines of several processes
    (torchrun's) never interleave into one line (a pipe write of up to 4 KiB is atomic)."""
    sys.stderr.flush()
    data = (text + "\n").encode(errors="replace")
    try:
        os.write(sys.stderr.fileno(), data)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured by a test)
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
