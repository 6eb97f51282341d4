"""The people at the site, as the scenario has them act: the coordinator refers patients, the nurse
and coordinator record what the calendar asks (or what the scenario says instead), the
investigator reports and adjudicates AEs, and the PI signs a waiting review with the code their
channel received.

Clinical entries go through the deployments, as the app's forms do; the nurse's bedside entries
(IL-2 doses, PK samples) are written as `nktrial record` writes them.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from sqlmodel import Session, func, select

from models.queries import ACTIVE, given_infusions, open_slot, require_subject
from models.tables import AdverseEvent, CalendarEventRow, EscalationDecision, EventStatus, Subject, SubjectStatus
from nktrial.receiver import Receiver
from nktrial.rehearsal.runner import PrefectRunner
from nktrial.rehearsal.steps import PI, REFERRAL, STAFF, SiteTime, Step
from nktrial.scenario import PatientSpec, Scenario
from protocol.calendar import Anchor, EventKey, EventKind
from protocol.dates import to_local
from protocol.definition import ProtocolDefinition
from protocol.errors import UserError
from protocol.three_plus_three import Action
from tasks import recording
from tasks.recording import LabResultInput

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples" / "screening-S-001.json"
TEMPLATE_DAY0 = dt.date(2027, 1, 31)  # the template's own planned day 0: its dates keep their distance from it
STAFF_KINDS = (EventKind.NK_INFUSION, EventKind.IL2_DOSE, EventKind.PK_SAMPLE, EventKind.VISIT_1_MONTH, EventKind.VISIT_3_MONTH)
# Synthetic donor NK counts for rehearsal PK (cells/µL at the peak, three days after an infusion) — not clinical values.
PK_PEAK_PER_1E8_CELLS = 4.0
INFUSION_2 = EventKey.nk_infusion(2)
INVESTIGATOR = "inv-01"  # who adjudicates DLTs in a rehearsal; their own channel's tag is staff:inv-01
COORDINATOR, NURSE = "coord-1", "nurse-1"  # who refers, records visits and labs; who gives infusions, IL-2 and takes PK samples


def site_staff(scenario: Scenario) -> list[tuple[str, str, str]]:
    """(staff ID, printed name, roles) of everyone a rehearsal acts as, the PI first (the register's bootstrap).
    Each one's own channel is the default tag staff:<staff ID>; the rehearsal's receiver has a path per staff ID."""
    return [(scenario.pi.signer_id, scenario.pi.printed_name, "pi,investigator"), (COORDINATOR, "Rehearsal Coordinator", "coordinator"),
            (NURSE, "Rehearsal Nurse", "nurse"), (INVESTIGATOR, "Rehearsal Investigator", "investigator")]


@functools.lru_cache(maxsize=1)
def _template() -> str:
    return TEMPLATE.read_text(encoding="utf-8")


def screening_for(p: PatientSpec, day0: dt.date) -> dict:
    """The template record with its dates moved so they keep their distance from the planned day 0."""
    record = json.loads(_template())
    shift = day0 - TEMPLATE_DAY0
    for key, value in record.items():
        if key.endswith("_on") and isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            record[key] = (dt.date.fromisoformat(value) + shift).isoformat()
    return {**record, **p.screening, "subject_id": p.id}


def pk_value(subject_id: str, cells_per_infusion: float, infusions: list[dt.datetime], sampled_at: dt.datetime) -> float:
    """A synthetic donor NK count: each infusion adds a curve peaking three days after it (rehearsal data only)."""
    peak = PK_PEAK_PER_1E8_CELLS * cells_per_infusion / 1e8 * (0.8 + 0.1 * (int(subject_id[2:]) % 5))
    total = 0.0
    for given in infusions:
        days = (sampled_at - given).total_seconds() / 86400
        if days > 0.01:
            total += peak * days / 3 * math.exp(1 - days / 3)
    return round(total + 0.5, 2)


def _after_infusion_2(key: str) -> bool:
    """A PK sample anchored to infusion 2 (its key's qualifier is "infusion_2+N")."""
    return EventKey.parse(key).qualifier.startswith(f"{Anchor.INFUSION_2.value}+")


class Staff:
    def __init__(self, scenario: Scenario, protocol: ProtocolDefinition, engine, *, site: SiteTime, runner: PrefectRunner,
                 receiver: Receiver, first_message: int):
        self.sc, self.p, self.engine, self.site, self.runner = scenario, protocol, engine, site, runner
        self.receiver, self.first_message = receiver, first_message  # a shared receiver may hold other trials' codes
        self.clock = site.clock
        self.done: set[tuple] = set()
        self.arrived: dict[str, dt.datetime] = {}
        self.waitlisted: set[str] = set()
        self.ae_ids: dict[tuple[str, int], int] = {}  # (subject, index in the scenario) → the AE's id in the trial database
        self.entries = 0  # bedside entries written

    # -- the PI -------------------------------------------------------------------------------------

    def step_pi(self) -> Step | None:
        if not self.runner.paused_since:
            return None
        run_id, since = min(self.runner.paused_since.items(), key=lambda kv: kv[1])
        return Step(since + dt.timedelta(hours=self.sc.pi.sign_after_hours), PI, "PI signs the cohort review", lambda: ("pi", self.sign(run_id)))

    def sign(self, run_id: str) -> str:
        with Session(self.engine) as s:
            d = s.exec(select(EscalationDecision).where(EscalationDecision.review_flow_run_id == run_id)).first()
            number = s.exec(select(func.count()).select_from(EscalationDecision).where(EscalationDecision.id <= d.id)).one()
        codes = self._codes(self.sc.pi.signer_id, f"decision {d.id},")
        if not codes:
            self.runner.paused_since.pop(run_id, None)
            return f"no signing code for decision {d.id} reached {self.sc.pi.signer_id}'s own channel; the review stays open"
        action = self.sc.pi.decisions.get(number, Action(d.recommended_action))
        result = self.runner.resume(run_id, {
            "signer_id": self.sc.pi.signer_id, "printed_name": self.sc.pi.printed_name, "decision": action.value,
            "meaning": self.p.escalation.signature_meanings.value[0],
            "signing_code": codes[-1], "rationale": "" if action.value == d.recommended_action else "rehearsal: the PI chose a more cautious action",
        })
        return f"resumed with {action.value}, code from the PI's own channel → " + result

    def _codes(self, signer: str, about: str) -> list[str]:
        """Signing codes that reached `signer`'s own channel (the receiver's path is the staff ID) for one act, oldest first."""
        found = [re.search(r"signing code (\d{8})", m.body) for m in self.receiver.messages[self.first_message:]
                 if m.path == signer and about in m.body]
        return [c.group(1) for c in found if c]

    # -- referrals ----------------------------------------------------------------------------------

    def step_referral(self) -> Step | None:
        if all(p.id in self.arrived for p in self.sc.patients) and not self.waitlisted:
            return None  # everyone referred, nobody waiting: nothing to look up
        with Session(self.engine) as s:
            slot = open_slot(s)
            free = slot.free if slot is not None else 0
            waitlisted = list(s.exec(select(Subject.subject_id).where(Subject.status == SubjectStatus.WAITLISTED).order_by(Subject.id)).all())
        self.waitlisted = set(waitlisted)
        fixed = [(self.site.local(self.sc.start + dt.timedelta(days=p.arrives_on_day), self.p.site.event_time), p)
                 for p in self.sc.patients if p.id not in self.arrived and p.arrives_on_day is not None]
        queue = [p for p in self.sc.patients if p.id in waitlisted] + \
                [p for p in self.sc.patients if p.id not in self.arrived and p.arrives_on_day is None]
        options = [(at, p) for at, p in fixed]
        if free > 0 and queue:
            options.append((self.site.next_morning(self.p.site.event_time), queue[0]))
        if not options:
            return None
        at, patient = min(options, key=lambda o: o[0])
        return Step(at, REFERRAL, f"{patient.id} referred", lambda: ("referral", self.refer(patient)))

    def refer(self, p: PatientSpec) -> str:
        self.arrived[p.id] = self.clock()
        self.waitlisted.add(p.id)  # until the next look-up says otherwise
        day0 = self.site.today() + dt.timedelta(days=self.sc.day0_after_days)
        request = {"subject_id": p.id, "screening": screening_for(p, day0),
                   "planned_day0": dt.datetime.combine(day0, self.p.site.event_time).isoformat(), "recorded_by": COORDINATOR}
        return self.runner.run_deployment("enroll-patient", {"request": request})

    # -- what the calendar asks, and the scenario's AEs and withdrawals -------------------------------

    def step_staff(self) -> Step | None:
        """The earliest thing a staff member does: what the calendar asks, changed by the scenario."""
        best: Step | None = None
        with Session(self.engine) as s:
            # In due order: the scenario only ever delays an action, so the first rows hold the earliest one.
            rows = s.exec(select(Subject, CalendarEventRow).join(CalendarEventRow, CalendarEventRow.subject_pk == Subject.id)
                          .where(Subject.status.in_(ACTIVE), CalendarEventRow.status == EventStatus.PLANNED,
                                 CalendarEventRow.kind.in_(STAFF_KINDS)).order_by(CalendarEventRow.due_at).limit(200)).all()
            inf2_done = set(s.exec(select(CalendarEventRow.subject_pk).where(
                CalendarEventRow.key == str(INFUSION_2), CalendarEventRow.status == EventStatus.DONE)).all())
            day0s = s.exec(select(Subject.subject_id, Subject.planned_day0_at).where(Subject.status.in_(ACTIVE))).all()
        for subject, row in rows:
            if best is not None and row.due_at > best.at:
                break
            spec = self.sc.patient(subject.subject_id)
            step = self._calendar_step(spec, subject, row, subject.id in inf2_done)
            if step and step.before(best):
                best = step
        for sid, day0_at in day0s:
            for step in self._scenario_steps(self.sc.patient(sid), to_local(self.site.tz, day0_at).date()):
                if step.before(best):
                    best = step
        return best

    def _calendar_step(self, spec: PatientSpec, subject: Subject, row: CalendarEventRow, inf2_done: bool) -> Step | None:
        sid, due = subject.subject_id, row.due_at
        delay = dt.timedelta(days=spec.infusion_2_delay_days)
        if row.kind is EventKind.NK_INFUSION:
            n = EventKey.parse(row.key).number
            if n == 2 and spec.infusion_2_missed:
                return None
            at = due + (delay if n == 2 else dt.timedelta(0))
            return Step(at, STAFF, f"{sid} NK infusion {n}", lambda: ("staff", self.infuse(sid, subject.dose_level, n)))
        if row.kind is EventKind.PK_SAMPLE:
            if _after_infusion_2(row.key) and not inf2_done:
                if spec.infusion_2_missed:
                    return None
                due = due + delay
            return Step(due, STAFF, f"{sid} {row.label}", lambda: ("staff", self.pk_sample(sid, row.protocol_day, subject.dose_level)))
        if row.kind is EventKind.IL2_DOSE:
            n = EventKey.parse(row.key).number
            if n in spec.il2_missed:  # written up the next morning, after rounds flagged it
                return Step(due + dt.timedelta(hours=25), STAFF, f"{sid} IL-2 dose {n} missed", lambda: ("staff", self.il2(sid, n, None)))
            return Step(due, STAFF, f"{sid} IL-2 dose {n}", lambda: ("staff", self.il2(sid, n, due)))
        visit = row.kind.value
        return Step(due, STAFF, f"{sid} {row.label}", lambda: ("staff", self.visit(sid, visit, to_local(self.site.tz, due).date(), spec)))

    def _scenario_steps(self, spec: PatientSpec, day0: dt.date) -> list[Step]:
        """The patient's AEs still to report or adjudicate, and their going off study, from the scenario."""
        sid, local, steps = spec.id, self.site.local, []
        for i, ae in enumerate(spec.adverse_events):
            onset = day0 + dt.timedelta(days=ae.day)
            if ("ae", sid, i) not in self.done:
                steps.append(Step(local(onset, dt.time(10, 0)), STAFF, f"{sid} AE reported",
                                  lambda i=i, ae=ae, onset=onset: ("staff", self.report_ae(sid, i, ae, onset))))
            elif ae.adjudicate != "leave" and ("adj", sid, i) not in self.done and (sid, i) in self.ae_ids:
                steps.append(Step(local(onset + dt.timedelta(days=ae.adjudicate_after_days), dt.time(11, 0)), STAFF,
                                  f"{sid} DLT adjudication", lambda i=i, ae=ae: ("staff", self.adjudicate(sid, i, ae))))
        if spec.off_study and ("off", sid) not in self.done:
            on = day0 + dt.timedelta(days=spec.off_study.day)
            steps.append(Step(local(on, dt.time(10, 0)), STAFF, f"{sid} off study", lambda: ("staff", self.take_off(sid, spec, on))))
        return steps

    # -- what staff do ------------------------------------------------------------------------------

    def infuse(self, sid: str, level: int, n: int) -> str:
        spec = self.sc.patient(sid)
        given_at = to_local(self.site.tz, self.clock()).isoformat()
        record = {"subject_id": sid, "infusion_number": n, "dose_level": level, "given_at": given_at,
                  "cells_infused": self.p.dose_level(level).cells_per_infusion, "product_lot": f"LOT-{sid}-{n}",
                  "deviation_reason": spec.deviation_reason if n == 2 and spec.infusion_2_delay_days else None, "recorded_by": NURSE}
        return self.runner.run_deployment("record-infusion", {"record": record})

    def _bedside(self, what: str, write: Callable[[], None]) -> str:
        """A bedside entry, written as `nktrial record` writes it; a refusal is the entry's result, not an error."""
        self.entries += 1
        try:
            write()
        except UserError as exc:
            return f"refused: {exc}"
        return what

    def il2(self, sid: str, n: int, given_at: dt.datetime | None) -> str:
        return self._bedside(
            f"IL-2 dose {n} {'given' if given_at else 'recorded as missed'} (nktrial record il2)",
            lambda: recording.record_il2_dose(self.engine, self.p, subject_id=sid, dose_number=n, given=given_at is not None,
                                            given_at=to_local(self.site.tz, given_at) if given_at else None,
                                            missed_reason=None if given_at else "rehearsal: dose not given", actor=NURSE,
                                            clock=self.clock))

    def pk_sample(self, sid: str, day: int, level: int) -> str:
        with Session(self.engine) as s:
            given = sorted(given_infusions(s, require_subject(s, sid)).values())
        value = pk_value(sid, self.p.dose_level(level).cells_per_infusion, given, self.clock())
        result = LabResultInput(subject_id=sid, kind="donor_nk_count", sampled_on=self.site.today(), pk_day=day,
                                donor_nk_cells_per_ul=value)
        return self._bedside(f"PK day {day}: {value} donor NK cells/µL (nktrial record lab)",
                             lambda: recording.record_lab_result(self.engine, self.p, result=result, actor=NURSE, clock=self.clock))

    def visit(self, sid: str, visit: str, on: dt.date, spec: PatientSpec) -> str:
        done = []
        if visit == EventKind.VISIT_3_MONTH.value:
            for kind, extra in (("mrd_mfc", {"mrd": spec.outcome.mrd.value}), ("response", {"response": spec.outcome.response.value})):
                result = {"subject_id": sid, "kind": kind, "sampled_on": on.isoformat(), "visit": visit, **extra}
                done.append(self.runner.run_deployment("record-lab-result", {"record": {"result": result, "recorded_by": COORDINATOR}}))
        done.append(self.runner.run_deployment("record-visit", {"record": {"subject_id": sid, "visit": visit, "done_on": on.isoformat(),
                                                                           "recorded_by": COORDINATOR}}))
        return "; ".join(done)

    def report_ae(self, sid: str, i: int, ae, onset: dt.date) -> str:
        self.done.add(("ae", sid, i))
        report = {"subject_id": sid, "term": ae.term, "category": ae.category.value, "grade": ae.grade, "onset_on": onset.isoformat(),
                  "attribution": ae.attribution.value, "serious": ae.serious}
        result = self.runner.run_deployment("report-adverse-event", {"report": report, "recorded_by": INVESTIGATOR})
        with Session(self.engine) as s:
            row = s.exec(select(AdverseEvent).join(Subject, Subject.id == AdverseEvent.subject_pk)
                         .where(Subject.subject_id == sid).order_by(AdverseEvent.id.desc())).first()
        if row is not None:
            self.ae_ids[(sid, i)] = row.id
        return result

    def adjudicate(self, sid: str, i: int, ae) -> str:
        self.done.add(("adj", sid, i))
        from tasks.delivery import load_channels
        from tasks.settings import get_settings
        from tasks.signing import SignedAct, send_signing_code

        ae_id, signer = self.ae_ids[(sid, i)], INVESTIGATOR
        try:  # as `nktrial ae code --ae N --signer inv-01` does: a fresh code to the investigator's own channel
            send_signing_code(self.engine, self.p, load_channels(get_settings().apprise_config), act=SignedAct.adjudication(ae_id),
                              signer_id=signer, clock=self.clock)
        except UserError as exc:
            return f"no signing code for AE {ae_id}: {exc}"
        codes = self._codes(signer, f"AE {ae_id},")
        request = {"ae_id": ae_id, "verdict": "DLT confirmed" if ae.adjudicate == "confirm" else "not a DLT",
                   "signing_code": codes[-1] if codes else "",
                   "reason": f"rehearsal: {ae.category.value} grade {ae.grade}, {ae.attribution.value}", "investigator_id": signer}
        return self.runner.run_deployment("adjudicate-dlt", {"request": request})

    def take_off(self, sid: str, spec: PatientSpec, on: dt.date) -> str:
        self.done.add(("off", sid))
        return self.runner.run_deployment("off-study", {"request": {"subject_id": sid, "reason": spec.off_study.reason.value,
                                                                    "effective_on": on.isoformat(), "recorded_by": INVESTIGATOR}})
