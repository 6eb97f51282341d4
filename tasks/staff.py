"""Who may write: the staff register and the check every write makes first.

`authorize` runs inside the writer's unit of work. A refusal raises AccessRefused with one
sentence naming the actor and the role needed; the unit of work rolls back and logs it.
"""

from __future__ import annotations

import datetime as dt

from sqlmodel import Session, select

from models.tables import Staff
from protocol.definition import ProtocolDefinition
from protocol.errors import AccessRefused
from protocol.roles import Act, allowed_roles, may


def staff_member(session: Session, staff_id: str) -> Staff | None:
    return session.exec(select(Staff).where(Staff.staff_id == (staff_id or "").strip())).first()


def authorize(session: Session, protocol: ProtocolDefinition, *, actor: str, act: Act, at: dt.datetime) -> Staff:
    """The registered, active staff member `actor`, if the delegation log lets one of their roles do `act`."""
    roles = " or ".join(r.value for r in allowed_roles(protocol.authority.acts, act))
    who = (actor or "").strip()
    member = staff_member(session, who) if who else None
    if member is None:
        raise AccessRefused(f"'{who or '(blank)'}' is not a registered staff member; to {act.value} you must be a registered {roles}",
                            actor=who or "(blank)", act=act.value)
    if not member.active_at(at):
        raise AccessRefused(f"{who} is not active on the staff register at this time; to {act.value} you must be an active {roles}",
                            actor=who, act=act.value)
    if not may(protocol.authority.acts, member.role_set, act):
        held = ", ".join(sorted(r.value for r in member.role_set)) or "no role"
        raise AccessRefused(f"{who} ({held}) may not {act.value}: the delegation log gives it to {roles}", actor=who, act=act.value)
    return member
