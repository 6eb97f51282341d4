"""Field types for the Prefect UI's forms: what a person types, in the words and units they use.

A time a person enters is site-local wall time in the protocol's timezone. The UI's date-time
picker would send the browser's zone (often UTC), so a time field here is plain text,
`YYYY-MM-DD HH:MM`, read as site time. The services turn it into a UTC instant and refuse a
time that does not exist or happens twice in the site's zone (a daylight-saving change).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

from tasks.runtime import protocol

SITE_TIME_PATTERN = r"^\s*\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?\s*$"
# What the server accepts: also an explicit offset, for API callers that send an instant. Only real dates and times: what
# passes the server's schema check must pass the flow's own parameter check too, or the run would fail on a parameter error
# instead of the form showing the field's rule at submit. The shape is `pattern` (short, as the refusal quotes it); the days
# no month has (Feb 30, Apr 31, Feb 29 outside leap years, year 0) are a `not` beside it.
_ACCEPTED_PATTERN = (r"^\s*\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?"
                     r"(Z|[+-]([01]\d|2[0-3]):?[0-5]\d)?\s*$")
_NO_SUCH_DAY = (r"^\s*(0000|\d{4}-(02-3[01]|(0[469]|11)-31)|\d\d([02468][1235679]|[13579][01345789])-02-29"
                r"|([02468][1235679]|[13579][01345789])00-02-29)")
_WITH_OFFSET = re.compile(r"(Z|[+-]\d{2}:?\d{2})$")


def site_zone() -> str:
    """The protocol's site timezone, named on every form that takes a time."""
    return protocol().timezone


def _site_time(value: Any) -> Any:
    """Text typed in a form -> a naive site-local datetime. A datetime object (a flow called in
    process) passes as it is: naive means site time, aware is converted by the services."""
    if isinstance(value, dt.datetime) or not isinstance(value, str):
        return value
    text = value.strip()
    if not re.match(_ACCEPTED_PATTERN, text) or re.match(_NO_SUCH_DAY, text):
        raise ValueError(f"'{value}' is not a site time: write YYYY-MM-DD HH:MM, e.g. 2027-01-31 09:00")
    if _WITH_OFFSET.search(text):  # an API caller may send an explicit instant; it is converted, not reinterpreted
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt.datetime.fromisoformat(text.replace(" ", "T"))


def _schema(title: str, what: str, *, optional: bool = False) -> dict:
    pattern = rf"^\s*$|{_ACCEPTED_PATTERN}" if optional else _ACCEPTED_PATTERN  # optional: empty text means not given
    return {"type": "string", "title": f"{title} (site time, {site_zone()})", "pattern": pattern,
            "not": {"type": "string", "pattern": _NO_SUCH_DAY},
            "description": f"{what}: site-local date and time in {site_zone()}, YYYY-MM-DD HH:MM (24-hour), e.g. 2027-01-31 09:00",
            "examples": ["2027-01-31 09:00"]}


def site_time(title: str, what: str) -> Any:
    """A required site-local date-time field for a form."""
    return Annotated[dt.datetime, BeforeValidator(_site_time), WithJsonSchema(_schema(title, what))]


def optional_site_time(title: str, what: str) -> Any:
    """An optional site-local date-time field: left empty means not given (no type switch in the form). The schema has
    no `default: null`, so the server's check accepts null for it as for any optional field (and the form sends "" or nothing)."""
    return Annotated[dt.datetime | None, BeforeValidator(_optional_site_time), WithJsonSchema(_schema(title, what, optional=True)),
                     Field(default=None, json_schema_extra=_no_default)]


def _optional_site_time(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and not value.strip()) else _site_time(value)


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


def _empty_is_none(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def optional_text(max_length: int, description: str | None = None) -> Any:
    """An optional text field that renders as one text box (no str/None switch): left empty means not given."""
    schema = {"type": "string", "maxLength": max_length, **({"description": description} if description else {})}
    def at_most(value: str | None) -> str | None:
        if value is not None and len(value) > max_length:
            raise ValueError(f"at most {max_length} characters")
        return value

    return Annotated[str | None, BeforeValidator(_empty_is_none), AfterValidator(at_most), WithJsonSchema(schema),
                     Field(default=None, json_schema_extra=_no_default)]


def optional_date(description: str) -> Any:
    """An optional date field that renders as one date picker (a date has no zone: it is the site's calendar day)."""
    return Annotated[dt.date | None, BeforeValidator(_empty_is_none), WithJsonSchema({"type": "string", "format": "date",
                                                                                        "description": description}),
                     Field(default=None, json_schema_extra=_no_default)]
