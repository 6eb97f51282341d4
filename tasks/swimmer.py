"""The swimmer plot: one lane per patient on protocol days, grouped by dose level.

Each lane shows the NK infusions, the IL-2 span (missed doses marked), the DLT window, AEs by
grade, confirmed DLTs, the outcome visits done, and going off study. Lanes are labelled with
subject IDs only.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

from models.tables import (  # noqa: E402
    Adjudication,
    Administration,
    AdministrationKind,
    AdverseEvent,
    CalendarEventRow,
    Enrollment,
    EventStatus,
    Subject,
    SubjectStatus,
)
from protocol.calendar import EventKey, EventKind  # noqa: E402
from protocol.dates import to_local  # noqa: E402
from protocol.definition import ProtocolDefinition  # noqa: E402

GRADE_COLOURS = {1: "#fde725", 2: "#f89540", 3: "#cc4778", 4: "#7e03a8", 5: "#0d0887"}


@dataclass
class Lane:
    subject_id: str
    dose_level: int
    end_day: int
    infusions: list[int] = field(default_factory=list)
    il2_given: list[int] = field(default_factory=list)
    il2_missed: list[int] = field(default_factory=list)
    aes: list[tuple[int, int, bool]] = field(default_factory=list)  # day, grade, confirmed DLT
    visits: list[int] = field(default_factory=list)
    off_study_day: int | None = None
    completed: bool = False


def lanes(session: Session, protocol: ProtocolDefinition, today: dt.date) -> list[Lane]:
    tz = protocol.timezone
    out = []
    rows = session.exec(select(Subject, Enrollment).join(Enrollment, Enrollment.subject_pk == Subject.id)
                        .order_by(Enrollment.dose_level, Enrollment.id)).all()
    for subject, enrollment in rows:
        admin = session.exec(select(Administration).where(Administration.subject_pk == subject.id)).all()
        inf1 = next((a.given_at for a in admin if a.kind is AdministrationKind.NK_INFUSION and a.event_key == "nk_infusion-1" and a.given), None)
        day0 = to_local(tz, inf1 or subject.planned_day0_at).date()

        def day(d: dt.date) -> int:
            return (d - day0).days

        lane = Lane(subject.subject_id, enrollment.dose_level, day(today))
        for a in admin:
            if a.kind is AdministrationKind.NK_INFUSION and a.given:
                lane.infusions.append(day(to_local(tz, a.given_at).date()))
            elif a.kind is AdministrationKind.IL2_DOSE:
                (lane.il2_given if a.given else lane.il2_missed).append(
                    day(to_local(tz, a.given_at).date()) if a.given else EventKey.parse(a.event_key).number + protocol.il2.first_day.value - 1)
        for ae in session.exec(select(AdverseEvent).where(AdverseEvent.subject_pk == subject.id)):
            lane.aes.append((day(ae.onset_on), ae.grade, ae.adjudication is Adjudication.CONFIRMED))
        for row in session.exec(select(CalendarEventRow).where(CalendarEventRow.subject_pk == subject.id,
                                                               CalendarEventRow.kind.in_([EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH]),
                                                               CalendarEventRow.status == EventStatus.DONE)):
            lane.visits.append(day(to_local(tz, row.actual_at).date()))
        if subject.status is SubjectStatus.OFF_STUDY and subject.off_study_on:
            lane.off_study_day = day(subject.off_study_on)
            lane.end_day = lane.off_study_day
        elif subject.status is SubjectStatus.COMPLETED and lane.visits:
            lane.completed = True
            lane.end_day = max(lane.visits)
        lane.end_day = max(lane.end_day, 0)
        out.append(lane)
    return out


def render(lanes_: list[Lane], protocol: ProtocolDefinition, *, title: str) -> bytes:
    """The PNG bytes of the swimmer plot."""
    n = len(lanes_)
    window = protocol.dlt.window
    fig_h = max(3.2, 0.42 * n + 2.2)
    fig, ax = plt.subplots(figsize=(12, fig_h), dpi=110)
    if not lanes_:
        ax.text(0.5, 0.5, "no patient enrolled yet", ha="center", va="center", transform=ax.transAxes, fontsize=12)
        ax.set_axis_off()
    max_day = max([l.end_day for l in lanes_] + [window.close_day + 2, 30])
    y_of = {}
    y = 0
    groups: list[tuple[int, float, float]] = []
    for level in sorted({l.dose_level for l in lanes_}):
        first = y
        for lane in (l for l in lanes_ if l.dose_level == level):
            y_of[lane.subject_id] = y
            y += 1
        groups.append((level, first, y - 1))
        y += 0.8  # a gap between dose levels
    for lane in lanes_:
        ly = y_of[lane.subject_id]
        close = window.close_day if lane.off_study_day is None else min(window.close_day, lane.off_study_day)  # it ends off study
        ax.broken_barh([(window.open_day, close - window.open_day + 1)], (ly - 0.38, 0.76), facecolors="#fbe3c8",
                       edgecolors="none", zorder=0)
        ax.plot([0, lane.end_day], [ly, ly], color="#9e9e9e", lw=1.2, zorder=1)
        if lane.il2_given:
            ax.broken_barh([(min(lane.il2_given), max(lane.il2_given) - min(lane.il2_given) + 1)], (ly - 0.12, 0.24),
                           facecolors="#7fbf7b", edgecolors="none", zorder=2)
        if lane.il2_missed:
            ax.scatter(lane.il2_missed, [ly] * len(lane.il2_missed), marker="x", s=28, color="#b2182b", zorder=4, linewidths=1.4)
        if lane.infusions:
            ax.scatter(lane.infusions, [ly] * len(lane.infusions), marker="v", s=70, color="#2166ac", zorder=5)
        for d, grade, dlt in lane.aes:
            ax.scatter([d], [ly + 0.22], marker="o", s=36, color=GRADE_COLOURS.get(grade, "#000000"), edgecolors="#333333",
                       linewidths=0.5, zorder=6)
            if dlt:
                ax.scatter([d], [ly - 0.25], marker="*", s=140, color="#d7191c", edgecolors="#67000d", linewidths=0.6, zorder=7)
        if lane.visits:
            ax.scatter(lane.visits, [ly] * len(lane.visits), marker="D", s=34, color="#ffffff", edgecolors="#1b7837", linewidths=1.4, zorder=5)
        if lane.off_study_day is not None:
            ax.scatter([lane.off_study_day], [ly], marker="X", s=90, color="#000000", zorder=8)
        elif not lane.completed:
            ax.annotate("", xy=(lane.end_day + 2.5, ly), xytext=(lane.end_day, ly),
                        arrowprops={"arrowstyle": "->", "color": "#616161", "lw": 1.2}, zorder=3)
    for level, first, last in groups:
        cells = protocol.dose_level(level).cells_per_infusion
        ax.text(1.005, (first + last) / 2, f"DL{level}\n{cells:.0e} cells", transform=ax.get_yaxis_transform(), ha="left", va="center",
                fontsize=9, fontweight="bold", color="#37474f")
        if first > 0:
            ax.axhline(first - 0.9, color="#cfd8dc", lw=0.8, zorder=0)
    if lanes_:
        ax.set_yticks([y_of[l.subject_id] for l in lanes_], [l.subject_id for l in lanes_], fontsize=9)
        ax.set_ylim(y - 0.6, -0.8)
        ax.set_xlim(-3, max_day + 6)
        ax.set_xlabel("protocol day (day 0 = NK infusion 1)")
        ax.grid(axis="x", color="#eeeeee", lw=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    ax.set_title(title, fontsize=11, loc="left")
    handles = [
        Line2D([], [], marker="v", ls="", color="#2166ac", markersize=8, label="NK infusion"),
        Patch(facecolor="#7fbf7b", label="IL-2 daily doses"),
        Line2D([], [], marker="x", ls="", color="#b2182b", markersize=7, mew=1.4, label="IL-2 dose missed"),
        Patch(facecolor="#fbe3c8", label=f"DLT window (days {window.open_day}–{window.close_day})"),
        *[Line2D([], [], marker="o", ls="", color=c, markeredgecolor="#333333", markersize=7, label=f"AE grade {g}")
          for g, c in GRADE_COLOURS.items()],
        Line2D([], [], marker="*", ls="", color="#d7191c", markersize=12, label="DLT (adjudicated)"),
        Line2D([], [], marker="D", ls="", color="#ffffff", markeredgecolor="#1b7837", mew=1.4, markersize=7, label="outcome visit done"),
        Line2D([], [], marker="X", ls="", color="#000000", markersize=8, label="off study"),
        Line2D([], [], color="#616161", marker=">", markersize=6, label="on study"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.07 + 0.25 / fig_h, 0.93, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def swimmer_png(session: Session, protocol: ProtocolDefinition, today: dt.date) -> bytes:
    """The trial's swimmer plot as of `today` (site date)."""
    return render(lanes(session, protocol, today), protocol,
                  title=f"{protocol.protocol.trial_id} · patients by dose level · as of {today} (site time)")
