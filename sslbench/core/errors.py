"""Errors a user can cause and fix, and warnings about settings that run but mislead.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2 (the traceback
only with ``--debug``). Raise it wherever bad input is detected, with a message that names
the problem and the fix (the valid choices, the bad key).

:func:`warn` is the softer sibling, for input that works but whose result would mislead (a
single class, tiny images, a k-NN k beyond its training images): one ``warning:`` line on stderr,
and the message kept in the record it is given (a run's ``results.json`` ``warnings``, a result
row's protocol), so the caveat stays with the figures it qualifies.
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""


def warn(message: str, record: list[str] | None = None, *, show: bool = True) -> None:
    """Say ``message`` as one line ``warning: MESSAGE`` on stderr (unless ``show`` is False) and
    append it to ``record`` (when given)."""
    if show:
        print(f"warning: {' '.join(message.split())}", file=sys.stderr)
    if record is not None:
        record.append(message)


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
