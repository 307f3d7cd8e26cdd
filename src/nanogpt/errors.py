"""The one exception type for bad input: the CLI prints its message as a single line and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (missing file, bad config, mismatched checkpoint...).

    The message names the problem and the fix, in one line; no traceback is shown unless `--debug`.
    """
