"""Staff roles. Each is also the apprise tag of the channels that serve it (site assumption:
INTERPRETATION.md, roles and authority)."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """A role on the delegation log; channels in the apprise config are tagged with these."""

    COORDINATOR = "coordinator"
    NURSE = "nurse"
    PI = "pi"
    CELL_LAB = "cell-lab"
    PHARMACY = "pharmacy"
    SAFETY = "safety"
