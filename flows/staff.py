"""manage-staff: add a staff member to the register, or deactivate one, from a typed form.

The PI (whoever the delegation log lets manage staff) names themself in `recorded_by`. The first
staff member, on an empty register, is added at the site terminal (`nktrial staff add`), not here.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from prefect import flow, get_run_logger
from prefect.states import Completed
from pydantic import BaseModel, Field

from flows.common import UserError, current_clock, protocol, refuses_user_errors, trial_engine
from flows.forms import optional_date, optional_text
from protocol.roles import STAFF_ID, Role
from tasks import staff
from tasks.staff import StaffId


class StaffChangeForm(BaseModel):
    """Add a staff member (staff_id, printed_name, roles; optionally channel_tag, active_from_on), or deactivate one (staff_id, reason)."""

    action: Literal["add", "deactivate"] = Field(description="add a staff member, or end one's authority from now")
    staff_id: str = Field(pattern=STAFF_ID.pattern, min_length=2, max_length=32, description="the staff member's ID, e.g. nurse-01")
    printed_name: optional_text(120, "add: the name as it appears on a signature")
    roles: list[Role] = Field(default_factory=list, description="add: their roles on the delegation log")
    channel_tag: optional_text(64, "add: apprise tag of their own channel (default: staff: and the staff ID, e.g. staff:nurse-01)")
    active_from_on: optional_date("add: the date their authority starts, from 00:00 site time (the protocol's timezone); default: now")
    reason: optional_text(300, "deactivate: why (kept in the audit trail)")
    recorded_by: StaffId


@flow(name="manage-staff", flow_run_name="staff · {change.action} {change.staff_id}")
@refuses_user_errors
def manage_staff(change: StaffChangeForm):
    """Add or deactivate a staff member; the unit of work audits it, and refuses anyone the delegation log does not allow."""
    if change.action == "add":
        if not change.printed_name or not change.roles:
            raise UserError("to add a staff member give printed_name and at least one role")
        out = staff.add_staff(trial_engine(), protocol(), staff_id=change.staff_id, printed_name=change.printed_name, roles=change.roles,
                              channel_tag=change.channel_tag, actor=change.recorded_by,
                              active_from=dt.datetime.combine(change.active_from_on, dt.time()) if change.active_from_on else None,
                              clock=current_clock())
    else:
        if change.printed_name or change.roles or change.channel_tag or change.active_from_on:
            raise UserError("to deactivate a staff member give only staff_id and reason; a staff member's details are never changed")
        out = staff.deactivate_staff(trial_engine(), protocol(), staff_id=change.staff_id, reason=change.reason or "",
                                     actor=change.recorded_by, clock=current_clock())
    get_run_logger().info(out.message)
    return Completed(name="Added" if change.action == "add" else "Deactivated", message=out.message)
