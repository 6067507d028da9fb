"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or a request we cannot honour; the message names the problem and the fix."""

    exit_code = 2


class NoRoom(UserError):
    """A write the disk could not hold (full, a quota, a file-size limit): the machine's state, not
    the input, so it exits as other system errors do."""

    exit_code = 4
