"""Every value of the protocol file carries where it comes from: the registry record, or a site
assumption for the PI to confirm (INTERPRETATION.md)."""

from __future__ import annotations

from enum import StrEnum
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Source(StrEnum):
    REGISTRY = "registry"
    ASSUMPTION = "assumption"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sourced(_Strict, Generic[T]):
    """One value with where it comes from."""

    value: T
    source: Source
    basis: str = ""


class Sourcing(_Strict):
    source: Source
    basis: str = ""
