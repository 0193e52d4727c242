"""The one exception type that reaches users as a single line."""


class RaygradError(ValueError):
    """Bad input or an unusable resource: the CLI prints the message alone
    (no traceback) and exits non-zero. Messages name the option, the value
    and what is allowed."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
