"""The project's error type (every expected failure is an LrpcError with a one-line message) and its warning."""

from __future__ import annotations


class LrpcError(Exception):
    """A failure the user can act on; ``str(err)`` is a single line that names the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class FormatError(LrpcError):
    """A `.lrpc` file that is not valid under docs/FORMAT.md."""


class LrpcWarning(UserWarning):
    """Advice about a run that will work but probably not do what the user wants; one line that names the fix."""
