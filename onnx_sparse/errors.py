"""The one exception type users see.

Everything a user can cause (a bad file, an unsupported model, a bad option) raises
:class:`OnnxSparseError` with what went wrong, where, and a hint. Internal bugs stay
assertions and ordinary exceptions, so the CLI can tell the two apart.
"""

from __future__ import annotations

__all__ = ["OnnxSparseError", "first_line"]


class OnnxSparseError(Exception):
    """A user-facing error: one line of what, where, and (optionally) a hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} (hint: {hint})" if hint else message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
