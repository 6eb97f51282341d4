"""Who may write: the staff register (the delegation log's people) and the check every write makes first.

`authorize` runs inside the writer's unit of work, as its first step. A refusal raises AccessRefused
with one sentence naming the actor and the role needed; the unit of work rolls back and logs it.

Adding and deactivating staff are writes like any other: audited, and allowed to whoever the
delegation log lets manage staff (the PI). The one exception is the bootstrap: while no active
staff member may manage staff, the first member added, who must hold such a role, is recorded as
`bootstrap:site`, at the site terminal (the CLI), never from a Prefect form.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Annotated

import sqlalchemy as sa
from pydantic import Field
from sqlmodel import Session, select

from models.clock import Clock
from models.db import UnitOfWork
from models.tables import Staff
from protocol.definition import ProtocolDefinition
from protocol.errors import AccessRefused, UserError
from protocol.recording import site_instant, site_local, site_text
from protocol.roles import STAFF_ID, Act, Role, allowed_roles, may, staff_id_problem

BOOTSTRAP_ACTOR = "bootstrap:site"
BLANK_ACTOR = "(blank)"  # what a unit of work records for a write nobody put their name to; never a staff ID
CHANNEL_TAG = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,63}$")

# A form's `recorded_by`: a well-formed staff ID (whether it is registered, active and allowed is `authorize`'s question).
StaffId = Annotated[str, Field(pattern=STAFF_ID.pattern, min_length=2, max_length=32,
                               description="your staff ID on the staff register, e.g. nurse-01")]


def recorded_as(actor: str | None) -> str:
    """The actor a unit of work records: a blank one becomes '(blank)', which `authorize` then refuses and logs."""
    return (actor or "").strip() or BLANK_ACTOR


def staff_member(session: Session, staff_id: str) -> Staff | None:
    return session.exec(select(Staff).where(Staff.staff_id == (staff_id or "").strip())).first()


def authorize(session: Session, protocol: ProtocolDefinition, *, actor: str, act: Act, at: dt.datetime) -> Staff:
    """The registered, active staff member `actor`, if the delegation log lets one of their roles do `act`."""
    roles = " or ".join(r.value for r in allowed_roles(protocol.authority.acts, act))
    who = (actor or "").strip()
    member = staff_member(session, who) if who and who != BLANK_ACTOR else None
    if member is None:
        raise AccessRefused(f"'{who or BLANK_ACTOR}' is not a registered staff member; to {act.value} you must be a registered {roles}",
                            actor=who or BLANK_ACTOR, act=act.value)
    if not member.active_at(at):
        raise AccessRefused(f"{who} is not active on the staff register at this time; to {act.value} you must be an active {roles}",
                            actor=who, act=act.value)
    if not may(protocol.authority.acts, member.role_set, act):
        held = ", ".join(sorted(r.value for r in member.role_set)) or "no role"
        raise AccessRefused(f"{who} ({held}) may not {act.value}: the delegation log gives it to {roles}", actor=who, act=act.value)
    return member


# -- reading the register -------------------------------------------------------------------------

@dataclass(frozen=True)
class StaffRow:
    staff_id: str
    printed_name: str
    roles: tuple[str, ...]
    channel_tag: str
    active_from_at: dt.datetime
    active_to_at: dt.datetime | None
    active: bool


def list_staff(engine: sa.Engine, *, at: dt.datetime) -> list[StaffRow]:
    """Everyone on the register, active or not, in the order they were added."""
    with Session(engine) as s:
        rows = s.exec(select(Staff).order_by(Staff.id)).all()
    return [StaffRow(m.staff_id, m.printed_name, tuple(r for r in m.roles.split(",") if r), m.channel_tag, m.active_from_at, m.active_to_at,
                     m.active_at(at)) for m in rows]


def _managers(session: Session, protocol: ProtocolDefinition, at: dt.datetime) -> list[Staff]:
    return [m for m in session.exec(select(Staff)).all()
            if m.active_at(at) and may(protocol.authority.acts, m.role_set, Act.MANAGE_STAFF)]


def bootstrap_open(engine: sa.Engine, protocol: ProtocolDefinition, *, at: dt.datetime) -> bool:
    """Whether nobody active on the register may manage staff yet (an empty register): the first add is the bootstrap."""
    with Session(engine) as s:
        return not _managers(s, protocol, at)


# -- changing the register ------------------------------------------------------------------------

def parse_roles(text: str | list) -> tuple[Role, ...]:
    """Roles from 'pi,investigator' (or a list), each a Role; one sentence for an unknown or missing one."""
    items = [str(getattr(r, "value", r)).strip().lower() for r in (text.split(",") if isinstance(text, str) else text)]
    items = [r for r in items if r]
    if not items:
        raise UserError(f"roles: give at least one role, from {', '.join(r.value for r in Role)}")
    known = {r.value: r for r in Role}
    for r in items:
        if r not in known:
            raise UserError(f"roles: '{r}' is not a role; roles are {', '.join(known)}")
    return tuple(dict.fromkeys(known[r] for r in items))


@dataclass(frozen=True)
class StaffChange:
    staff_id: str
    message: str
    bootstrap: bool = False


def _check_new_member(staff_id: str, printed_name: str, channel_tag: str) -> None:
    if problem := staff_id_problem(staff_id):
        raise UserError(problem)
    if not printed_name or len(printed_name) > 120:
        raise UserError("printed_name: give the name as it appears on a signature, 1 to 120 characters")
    if not CHANNEL_TAG.match(channel_tag):
        raise UserError(f"channel_tag '{channel_tag}' is not an apprise tag: up to 64 lower case letters, digits, '.', '_', ':' or '-'")


def add_staff(
    engine: sa.Engine, protocol: ProtocolDefinition, *, staff_id: str, printed_name: str, roles: str | list, channel_tag: str | None = None,
    active_from: dt.datetime | None = None, actor: str | None, clock: Clock, allow_bootstrap: bool = False,
) -> StaffChange:
    """Add a staff member (active from now, or from the site-local `active_from`). Needs a staff manager;
    on a register with none, and where `allow_bootstrap` (the site terminal), the first member must be one."""
    staff_id, printed_name = (staff_id or "").strip(), " ".join((printed_name or "").split())
    role_set = parse_roles(roles)
    tag = (channel_tag or "").strip() or f"staff:{staff_id}"
    _check_new_member(staff_id, printed_name, tag)
    managing = allowed_roles(protocol.authority.acts, Act.MANAGE_STAFF)
    bootstrap = bootstrap_open(engine, protocol, at=clock())
    if bootstrap:
        if not allow_bootstrap:
            raise UserError("the staff register has no one who may manage staff yet: add the first staff member, the PI, at the site "
                            "terminal with `nktrial staff add`")
        if not any(r in managing for r in role_set):
            raise UserError(f"the staff register is empty: the first staff member must be a {' or '.join(r.value for r in managing)} "
                            f"(roles {', '.join(r.value for r in role_set)} cannot add anyone after them)")
    writer = BOOTSTRAP_ACTOR if bootstrap else recorded_as(actor)
    why = "the first staff member (bootstrap)" if bootstrap else f"staff {staff_id} added"
    try:
        with UnitOfWork(engine, actor=writer, reason=why, clock=clock) as u:
            s = u.session
            if bootstrap:
                if _managers(s, protocol, u.at):
                    raise UserError("someone who may manage staff was added meanwhile; name yourself and add this staff member again")
            else:
                authorize(s, protocol, actor=actor or "", act=Act.MANAGE_STAFF, at=u.at)
            if (existing := staff_member(s, staff_id)) is not None:
                raise UserError(_duplicate(protocol, existing))
            start = u.at if active_from is None else site_instant(protocol, site_local(protocol, active_from), "active_from")
            if bootstrap and start > u.at:
                raise UserError("active_from: the first staff member must be active from now, not later")
            s.add(Staff(staff_id=staff_id, printed_name=printed_name, roles=",".join(r.value for r in role_set), channel_tag=tag,
                        active_from_at=start, created_at=u.at))
            u.commit()
    except sa.exc.IntegrityError:
        raise UserError(f"staff ID {staff_id} is already on the staff register; a staff ID is never reused") from None
    held = ", ".join(r.value for r in role_set)
    since = "" if active_from is None else f", active from {site_text(protocol, active_from)}"
    message = f"{staff_id} ({printed_name}) added to the staff register as {held}{since}; their own channel is tag '{tag}'"
    if bootstrap:
        message += (f". Recorded as {BOOTSTRAP_ACTOR}: the register had no one who may manage staff, so this first member needed no "
                    f"one's authority. Add everyone else as {staff_id}: nktrial --as {staff_id} staff add ...")
    return StaffChange(staff_id, message, bootstrap)


def _duplicate(protocol: ProtocolDefinition, existing: Staff) -> str:
    state = "active" if existing.active_to_at is None else f"deactivated {site_text(protocol, existing.active_to_at)}"
    return (f"staff ID {existing.staff_id} is already on the staff register ({existing.printed_name}, {existing.roles}, {state}); "
            "a staff ID is never reused")


def deactivate_staff(engine: sa.Engine, protocol: ProtocolDefinition, *, staff_id: str, reason: str, actor: str,
                     clock: Clock) -> StaffChange:
    """End a staff member's authority from now; the row, and everything they wrote, stays."""
    staff_id, reason = (staff_id or "").strip(), " ".join((reason or "").split())
    if not reason:
        raise UserError("reason: say why the staff member is deactivated (kept in the audit trail)")
    with UnitOfWork(engine, actor=recorded_as(actor), reason=f"staff {staff_id or '?'} deactivated: {reason}"[:500], clock=clock) as u:
        s = u.session
        authorize(s, protocol, actor=actor, act=Act.MANAGE_STAFF, at=u.at)
        member = staff_member(s, staff_id)
        if member is None:
            raise UserError(f"staff ID {staff_id} is not on the staff register")
        if member.active_to_at is not None and member.active_to_at <= u.at:
            raise UserError(f"{staff_id} is already inactive since {site_text(protocol, member.active_to_at)}")
        if [m.staff_id for m in _managers(s, protocol, u.at)] == [staff_id]:
            raise UserError(f"{staff_id} is the last active staff member who may manage staff: add another "
                            f"{' or '.join(r.value for r in allowed_roles(protocol.authority.acts, Act.MANAGE_STAFF))} first")
        member.active_to_at = u.at
        s.add(member)
        u.commit()
    return StaffChange(staff_id, f"{staff_id} is no longer active on the staff register from {site_text(protocol, u.at)}; "
                                 "their past entries stay as they were")
