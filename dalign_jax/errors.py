"""The one exception type for bad input: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """Input a user can fix; the message names the file, line or field."""
