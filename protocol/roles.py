"""Staff roles and the acts each may perform: the site's delegation-of-authority log as data.

The record names no roles; which role may do what is a site assumption (INTERPRETATION.md, roles
and authority), kept in the protocol file's `authority` section so that the site can change it
without code.
"""

from __future__ import annotations

import re
from enum import StrEnum

STAFF_ID = re.compile(r"^[a-z][a-z0-9._-]{1,31}$")  # e.g. pi-01, nurse.wang; lower case, no spaces, no colon


class Role(StrEnum):
    """A role on the delegation log; channels in the apprise config are tagged with these."""

    COORDINATOR = "coordinator"
    NURSE = "nurse"
    INVESTIGATOR = "investigator"
    PI = "pi"
    CELL_LAB = "cell-lab"
    PHARMACY = "pharmacy"
    SAFETY = "safety"


class Act(StrEnum):
    """What a staff member does that writes to the trial record. The value reads in a sentence."""

    MANAGE_STAFF = "manage staff"
    ENROLL = "screen and enroll a patient"
    RECORD_INFUSION = "record an NK infusion"
    RECORD_IL2 = "record an IL-2 dose"
    RECORD_VISIT_OR_LAB = "record a visit, a lab or a PK result"
    REPORT_AE = "report or update an adverse event"
    ADJUDICATE_DLT = "adjudicate a DLT"
    SIGN_ESCALATION = "sign a cohort escalation decision"
    RECORD_SAE_REPORT = "record an expedited SAE report"
    OFF_STUDY = "put a patient off study"


def allowed_roles(authority: dict[Act, tuple[Role, ...]], act: Act) -> tuple[Role, ...]:
    return authority.get(act, ())


def may(authority: dict[Act, tuple[Role, ...]], roles: frozenset[Role], act: Act) -> bool:
    """Whether someone holding `roles` may perform `act` under the delegation log."""
    return any(r in roles for r in allowed_roles(authority, act))


def staff_id_problem(staff_id: str) -> str | None:
    """None for a well-formed staff ID, else the sentence that says what is wrong."""
    if not STAFF_ID.match(staff_id or ""):
        return (f"staff ID '{staff_id}' is not a staff ID: 2 to 32 characters, lower case letters, digits, '.', '_' or '-', "
                "starting with a letter")
    return None
