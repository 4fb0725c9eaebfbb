"""Errors a user can cause and fix.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2 (the traceback
only with ``--debug``). Raise it wherever bad input is detected, with a message that names
the problem and the fix (the valid choices, the bad key).
"""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""
