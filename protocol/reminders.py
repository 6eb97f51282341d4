"""When the system should act on a calendar event: a pure function of the calendar and the protocol.

Each actionable event gets one trigger instant. IL-2 doses get none here: daily rounds cover
them for every patient at once, so runs scale with patients, not with days × patients.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from protocol.calendar import CalendarEvent, EventKey, EventKind
from protocol.dates import local_instant
from protocol.definition import ProtocolDefinition


class ReminderAction(StrEnum):
    PRODUCT_REQUEST = "product_request"
    INFUSION_PREP = "infusion_prep"
    VISIT_WINDOW_OPEN = "visit_window_open"
    PK_SAMPLE_DUE = "pk_sample_due"
    DLT_WINDOW_CLOSED = "dlt_window_closed"


ACTION_BY_KIND = {
    EventKind.PRODUCT_REQUEST: ReminderAction.PRODUCT_REQUEST,
    EventKind.NK_INFUSION: ReminderAction.INFUSION_PREP,
    EventKind.VISIT_1_MONTH: ReminderAction.VISIT_WINDOW_OPEN,
    EventKind.VISIT_3_MONTH: ReminderAction.VISIT_WINDOW_OPEN,
    EventKind.PK_SAMPLE: ReminderAction.PK_SAMPLE_DUE,
    EventKind.DLT_WINDOW_CLOSE: ReminderAction.DLT_WINDOW_CLOSED,
}


@dataclass(frozen=True)
class Reminder:
    event_key: str
    action: ReminderAction
    trigger_at: dt.datetime  # UTC
    due_on: dt.date  # local date the event itself is due
    label: str  # short, for run names: "infusion 2 prep"


def reminder_label(e: CalendarEvent, action: ReminderAction) -> str:
    """Short words for a reminder, used in run names: \"infusion 2 prep\"."""
    match action:
        case ReminderAction.INFUSION_PREP:
            return f"infusion {EventKey.parse(e.key).number} prep"
        case ReminderAction.PRODUCT_REQUEST:
            return f"product request {EventKey.parse(e.key).number}"
        case ReminderAction.VISIT_WINDOW_OPEN:
            return f"{e.label} window"
        case ReminderAction.PK_SAMPLE_DUE:
            return f"PK day {e.protocol_day}"
        case ReminderAction.DLT_WINDOW_CLOSED:
            return "DLT window closed"


def reminder_for(protocol: ProtocolDefinition, e: CalendarEvent) -> Reminder | None:
    """The one reminder an event triggers, or None for events acted on elsewhere (IL-2) or not at all."""
    action = ACTION_BY_KIND.get(e.kind)
    if action is None:
        return None
    if action is ReminderAction.INFUSION_PREP:
        at = e.at_utc - dt.timedelta(days=protocol.notifications.infusion_prep_lead_days)
    elif action is ReminderAction.VISIT_WINDOW_OPEN:
        at, _ = local_instant(protocol.timezone, e.window_start, protocol.site.event_time, what=e.label)
    else:
        at = e.at_utc
    return Reminder(event_key=e.key, action=action, trigger_at=at, due_on=e.local_date, label=reminder_label(e, action))
