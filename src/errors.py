"""Errors caused by the user's input (a bad value, a missing file, an incompatible model pair).

``python -m src`` prints these as one line naming the problem and the fix (set ``SP_SAMP_TRACEBACK=1`` for
the full traceback); any other exception is a bug and keeps its traceback. Each class also derives from
the matching built-in exception, so callers can catch ``ValueError`` / ``FileNotFoundError`` as usual.
Plain Python (no dependencies): every layer, :mod:`src.decoding` included, may raise these.
"""


class UserInputError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class InvalidParameterError(UserInputError, ValueError):
    """An out-of-range or inconsistent parameter."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file, folder, package or model that does not exist."""


class MalformedInputError(UserInputError, ValueError):
    """A file that exists but cannot be read as expected (says which line)."""


class OutputExistsError(UserInputError, FileExistsError):
    """A results file that would be overwritten or mixed with another run."""


class OutputNotWritableError(UserInputError, PermissionError):
    """A results location that cannot be written."""


class IncompatibleModelsError(UserInputError, ValueError):
    """A draft that cannot serve the target (tokenizer mismatch), or a judge trained for another pair."""


def is_positive_int(value: object, minimum: int = 1) -> bool:
    """Whether ``value`` is an int >= ``minimum`` and not a bool (``True`` is an int to Python, but ``k: true`` in
    a config is a typo, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_positive_int(name: str, value: object, hint: str = "use an integer >= 1", minimum: int = 1) -> None:
    """Refuse ``value`` unless :func:`is_positive_int`, in one line naming it and the fix: ``name=value is
    invalid: hint``."""
    if not is_positive_int(value, minimum):
        raise InvalidParameterError(f"{name}={value!r} is invalid: {hint}")
