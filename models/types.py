"""Column types shared by the trial tables."""

from __future__ import annotations

import datetime as dt
from enum import Enum

import sqlalchemy as sa


class UTCDateTime(sa.types.TypeDecorator):
    """An instant stored in UTC: refuses naive datetimes, returns aware UTC on every engine."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("a naive datetime cannot be stored: give an aware instant (UTC)")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def enum_type(enum: type[Enum], length: int = 32) -> sa.Enum:
    """A portable enum column: a VARCHAR holding the enum's value, read back as the member."""
    return sa.Enum(enum, native_enum=False, values_callable=lambda e: [m.value for m in e], length=length, validate_strings=True)
