"""The one exception type for a user's mistake.

The CLI prints its message (which names the file, the record and the fix) without a
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, config or files, explained with the fix."""
