"""The one exception type that reaches users as a single line."""


class RaygradError(ValueError):
    """Bad input or an unusable resource: the CLI prints the message alone
    (no traceback) and exits non-zero. Messages name the option, the value
    and what is allowed."""
