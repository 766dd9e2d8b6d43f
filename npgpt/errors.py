"""One exception type for problems the user can fix (bad input, bad config, missing files).

The CLI prints such errors as a single line on stderr and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class NpgptError(Exception):
    """A user-facing error: the message is the whole story, no traceback needed."""
