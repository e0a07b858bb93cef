"""User-facing errors.

A `UserError` is a mistake the user can fix (bad path, bad config, bad data). The CLI prints
its message without a stack trace and exits with status 2. Messages say what was found, what
was expected and how to fix it.
"""


class UserError(Exception):
    """An error caused by user input, reported without a traceback."""
