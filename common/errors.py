"""The exceptions the package raises for a user to read, and the one-line description of any error.

Imports no other module of common."""
from __future__ import annotations


class UsageError(Exception):
    """A problem with the user's input or environment: reported as one message, exit code 2."""


def describe_error(error: BaseException) -> str:
    """'Type: first line of the message', short enough for a one-line error report."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


class SaveError(OSError):
    """Writing a result file failed (a full disk, a lost mount): OSError's errno, strerror and the file's name."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


class UnreadableImage(Exception):
    """An image file that cannot be predicted (not an image, truncated, too large): skipped with this reason."""
