"""Errors a user can cause. Each carries one sentence that names the field and the rule."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from a person: shown as one sentence, never as a traceback."""


class AccessRefused(UserError):
    """A write by someone who is not registered, not active, or whose role does not allow it.

    The unit of work that sees it rolls back and logs the refusal in a transaction of its own.
    """

    def __init__(self, sentence: str, *, actor: str, act: str):
        super().__init__(sentence)
        self.actor, self.act = actor, act


class ProtocolFileError(UserError):
    """The protocol file is malformed or inconsistent."""


class CalendarError(UserError):
    """A calendar cannot be computed from the given anchors."""


class HistoryError(UserError):
    """An escalation history breaks the outcome notation or the design's rules."""


def first_validation_error(exc, what: str) -> str:
    """One sentence from a pydantic ValidationError: the first failing field and its rule."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    msg = err.get("msg", "is invalid").removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    tail = f" ({more} more problem{'s' if more > 1 else ''} after this one)" if more else ""
    return f"{what}: field '{loc}': {msg}{tail}"
