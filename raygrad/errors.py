"""The exception type that reaches users as a single line, and the one a SIGTERM raises."""


class RaygradError(ValueError):
    """Bad input or an unusable resource: the CLI prints the message alone
    (no traceback) and exits non-zero. Messages name the option, the value
    and what is allowed."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (a scheduler ending or preempting the job): it unwinds like
    Ctrl-C, so finished shards are saved and the resume command printed, and is not caught by
    `except Exception`."""


def raise_terminated(signum, frame) -> None:
    raise Terminated("SIGTERM")
