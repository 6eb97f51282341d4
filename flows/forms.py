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

from pydantic import BeforeValidator, Field, WithJsonSchema

from tasks.runtime import protocol

SITE_TIME_PATTERN = r"^\s*\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?\s*$"
# what the server accepts: also an explicit offset, for API callers that send an instant
_ACCEPTED_PATTERN = r"^\s*\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?\s*$"
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
    if _WITH_OFFSET.search(text):  # an API caller may send an explicit instant; it is converted, not reinterpreted
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if not re.match(_ACCEPTED_PATTERN, text):
        raise ValueError(f"'{value}' is not a site time: write YYYY-MM-DD HH:MM, e.g. 2027-01-31 09:00")
    return dt.datetime.fromisoformat(text.replace(" ", "T"))


def _schema(title: str, what: str) -> dict:
    return {"type": "string", "title": f"{title} (site time, {site_zone()})", "pattern": _ACCEPTED_PATTERN,
            "description": f"{what}: site-local date and time in {site_zone()}, YYYY-MM-DD HH:MM (24-hour), e.g. 2027-01-31 09:00",
            "examples": ["2027-01-31 09:00"]}


def site_time(title: str, what: str) -> Any:
    """A required site-local date-time field for a form."""
    return Annotated[dt.datetime, BeforeValidator(_site_time), WithJsonSchema(_schema(title, what))]


def optional_site_time(title: str, what: str) -> Any:
    """An optional site-local date-time field: left empty means not given (no type switch in the form)."""
    return Annotated[dt.datetime | None, BeforeValidator(lambda v: None if v in ("", None) else _site_time(v)),
                     WithJsonSchema(_schema(title, what)), Field(default=None)]
