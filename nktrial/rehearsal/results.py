"""A rehearsal's outcome as typed rows, read from its trial database, and the 3+3 check: what the
rules imply, replayed independently of the flows, against what the rehearsal did."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from sqlmodel import Session, func, select

from models.queries import get_subject
from models.tables import Adjudication, AdverseEvent, DoseLevelState, Enrollment, EscalationDecision, LevelStatus, Signature, Subject
from nktrial.scenario import Scenario
from protocol.cohorts import refuse_bolder
from protocol.definition import ProtocolDefinition
from protocol.three_plus_three import Action, too_toxic


class _Row:
    """A row also reads like the dict it is written out as: `row["status"]` is `row.status`."""

    def __getitem__(self, key: str):
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def of(cls, value):
        return value if isinstance(value, cls) else cls(**value)


@dataclass
class PatientResult(_Row):
    subject_id: str
    status: str  # a SubjectStatus value, or "not referred"
    dose_level: int | None
    cohort: int | None
    evaluable: bool | None  # None: not enrolled; False: replaced
    dlts: int
    outcome: str  # the DLT window's state for the 3+3 ("" when not counted)


@dataclass
class LevelResult(_Row):
    dose_level: int
    status: LevelStatus
    patients: int  # evaluable, as the 3+3 counts them
    dlts: int


@dataclass
class DecisionResult(_Row):
    history: str
    recommended: Action
    recommended_level: int | None
    signed: Action | None = None  # None: waiting for the PI
    level: int | None = None  # the level the signed action targets
    mtd: int | None = None
    signed_at: str | None = None  # site-local
    signer: str | None = None

    def __post_init__(self):
        self.recommended = Action(self.recommended)
        self.signed = Action(self.signed) if self.signed else None


@dataclass
class StepTimes(_Row):
    steps: int
    seconds: float
    median_ms: int


@dataclass
class Result:
    scenario: str
    title: str
    history: str
    mtd: int | None
    trial_open: bool
    patients: list[PatientResult]
    levels: list[LevelResult]
    decisions: list[DecisionResult]
    virtual_days: int
    runs_executed: int
    staff_entries: int
    notices_sent: int
    wall_seconds: float
    event_log: str
    reports: str
    wall_by_kind: dict[str, StepTimes] = field(default_factory=dict)  # kind → steps, seconds, median ms
    problems: list[str] = field(default_factory=list)

    def __post_init__(self):  # rows given as dicts (e.g. read back from JSON) become typed rows
        self.patients = [PatientResult.of(p) for p in self.patients]
        self.levels = [LevelResult.of(lv) for lv in self.levels]
        self.decisions = [DecisionResult.of(d) for d in self.decisions]
        self.wall_by_kind = {k: StepTimes.of(v) for k, v in self.wall_by_kind.items()}

    def as_dict(self) -> dict:
        """Plain values only (enums as their values), as `nktrial simulate --json` prints them."""
        return asdict(self, dict_factory=lambda items: {k: v.value if isinstance(v, Enum) else v for k, v in items})


def check(res: Result, design, sc: Scenario) -> list[str]:
    """What the 3+3 rules imply, replayed independently of the flows, against what the rehearsal did."""
    problems = []
    try:
        cohorts = design.parse(res.history)
        if cohorts and cohorts[-1].n < design.cohort_size and not too_toxic(design.tallies(cohorts)[cohorts[-1].dose_level].dlts):
            cohorts = cohorts[:-1]  # the newest cohort is still in its DLT windows (a rehearsal cut short by max_days)
        design.validate(cohorts)
    except ValueError as exc:
        problems.append(f"the final history is not one 3+3 can produce: {exc}")
    for i, d in enumerate(res.decisions, start=1):
        rule = design.decide(design.parse(d.history))
        if (d.recommended, d.recommended_level) != (rule.action, rule.dose_level):
            problems.append(f"decision {i} at {d.history!r} recommended {d.recommended} DL{d.recommended_level}; "
                            f"the rule says {rule.action.value} DL{rule.dose_level}")
        if d.signed is None:
            continue
        if refuse_bolder(rule.action, d.signed):
            problems.append(f"decision {i} signed {d.signed}, bolder than the rule's {rule.action.value}")
        if d.signed is Action.STOP and d.mtd != rule.mtd:
            problems.append(f"decision {i} stopped with MTD {d.mtd}; the rule's MTD is {rule.mtd}")
    if res.decisions and res.decisions[-1].signed is Action.STOP and res.trial_open:
        problems.append("the trial stopped but a dose level is still open")
    if sc.expect:
        x = sc.expect
        got = [d.signed for d in res.decisions if d.signed]
        if res.history != x.history:
            problems.append(f"history is {res.history!r}; the scenario expects {x.history!r}")
        if got != x.decisions:
            problems.append(f"decisions are {[a.value for a in got]}; the scenario expects {[a.value for a in x.decisions]}")
        if res.mtd != x.mtd:
            problems.append(f"MTD is {res.mtd}; the scenario expects {x.mtd}")
        status = {p.subject_id: p.status for p in res.patients}
        for sid, want in x.statuses.items():
            if status.get(sid) != want:
                problems.append(f"{sid} is {status.get(sid)}; the scenario expects {want}")
    return problems


def step_times(log) -> dict[str, StepTimes]:
    """Per kind of step in the event log: how many, their wall seconds, the median in ms."""
    times = {}
    for kind in sorted({e.kind for e in log}):
        ms = sorted(e.wall_ms for e in log if e.kind == kind)
        times[kind] = StepTimes(len(ms), round(sum(ms) / 1000, 1), ms[len(ms) // 2])
    return times


def read_result(engine, protocol: ProtocolDefinition, sc: Scenario, *, stamp: Callable, **counts) -> Result:
    """The rehearsal's final state from its trial database, checked against the 3+3 rules. `counts`: the
    Result's remaining fields (virtual_days, runs_executed, staff_entries, notices_sent, wall_seconds, event_log, reports)."""
    from protocol.cohorts import design_for
    from tasks.escalation_gate import trial_state

    design = design_for(protocol)
    with Session(engine) as s:
        state = trial_state(s, protocol)
        outcome = {o.subject_id: o for o in state.patients}
        dlts = dict(s.exec(select(Subject.subject_id, func.count()).join(AdverseEvent, AdverseEvent.subject_pk == Subject.id)
                           .where(AdverseEvent.adjudication == Adjudication.CONFIRMED).group_by(Subject.subject_id)).all())
        enrollments = {sid: e for e, sid in s.exec(select(Enrollment, Subject.subject_id)
                                                   .join(Subject, Subject.id == Enrollment.subject_pk))}
        patients = []
        for spec in sc.patients:
            subj = get_subject(s, subject_id=spec.id)
            e = enrollments.get(spec.id)
            patients.append(PatientResult(
                subject_id=spec.id, status=subj.status.value if subj else "not referred", dose_level=subj.dose_level if subj else None,
                cohort=e.cohort if e else None, evaluable=None if e is None else e.evaluable, dlts=dlts.get(spec.id, 0),
                outcome=outcome[spec.id].status if spec.id in outcome else ""))
        tallies = design.tallies(state.cohorts)
        levels = [LevelResult(lv.level, lv.status, tallies[lv.level].n, tallies[lv.level].dlts)
                  for lv in s.exec(select(DoseLevelState).order_by(DoseLevelState.level))]
        decisions = []
        for d in s.exec(select(EscalationDecision).order_by(EscalationDecision.id)):
            sig = s.exec(select(Signature).where(Signature.decision_id == d.id)).first()
            decisions.append(DecisionResult(d.history, d.recommended_action, d.recommended_level, d.chosen_action, d.chosen_level, d.mtd,
                                            stamp(sig.signed_at) if sig else None, sig.signer_id if sig else None))
        trial_open = s.exec(select(func.count()).select_from(DoseLevelState)
                            .where(DoseLevelState.status.in_([LevelStatus.OPEN, LevelStatus.FULL]))).one() > 0
    final = decisions[-1] if decisions else None
    mtd = final.mtd if final and final.signed is Action.STOP else None
    res = Result(sc.name, sc.title, state.history, mtd, trial_open, patients, levels, decisions, **counts)
    res.problems = check(res, design, sc)
    return res
