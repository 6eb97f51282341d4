"""The escalation gate's pure rules: who counts, when a cohort is ready for review, and what the PI may sign.

Plain values in, plain values out: the database rows are turned into `PatientRecord`s by the
caller, and the 3+3 decision itself is `protocol.three_plus_three`. INTERPRETATION.md, "Dose
escalation: classical 3+3".
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

from protocol.definition import ProtocolDefinition
from protocol.errors import UserError
from protocol.three_plus_three import BOLDNESS, Action, Cohort, Decision, Design, too_toxic


def design_for(protocol: ProtocolDefinition) -> Design:
    """The 3+3 design the protocol file describes: its dose levels and cohort size."""
    return Design(num_levels=len(protocol.dose_levels.levels), cohort_size=protocol.escalation.cohort_size.value)


def evaluable_at_window_close(infusions_given: int, infusions_planned: int, already_evaluable: bool | None) -> bool:
    """At the close of the DLT window: evaluable if every planned infusion was given, or already
    evaluable (a DLT in the window made the patient count)."""
    return infusions_given == infusions_planned or bool(already_evaluable)


# -- the trial's history, from adjudicated outcomes ------------------------------------------------

@dataclass(frozen=True)
class PatientRecord:
    """One enrolled patient as the gate reads them (plain values from the trial database)."""

    subject_id: str
    dose_level: int
    cohort: int
    evaluable: bool | None
    dlt_window_closed_at: dt.datetime | None = None
    had_dlt: bool = False  # a confirmed (adjudicated) DLT
    dlt_adjudicated_at: dt.datetime | None = None
    not_dosed: str | None = None  # words, when a signed stop or de-escalation ended their dosing before it began


@dataclass
class PatientOutcome:
    subject_id: str
    dose_level: int
    cohort: int
    letter: str | None  # "T" confirmed DLT, "N" evaluable without DLT, None pending or replaced
    status: str  # words for the cohort status table


WINDOW_OPEN = "DLT window open"


def patient_outcome(p: PatientRecord) -> tuple[PatientOutcome, dt.datetime | None]:
    """The patient's letter in the outcome notation and the words for the status table, with the
    instant their outcome became known (None while it is not)."""
    if p.had_dlt:
        letter, status, known_at = "T", "DLT (adjudicated)", p.dlt_adjudicated_at
    elif p.not_dosed:
        letter, status, known_at = None, p.not_dosed, None
    elif p.dlt_window_closed_at is not None and p.evaluable:
        letter, status, known_at = "N", "DLT window closed, no DLT", p.dlt_window_closed_at
    elif p.evaluable is False:
        letter, status, known_at = None, "not evaluable (to be replaced)", None
    else:
        letter, status, known_at = None, WINDOW_OPEN, None
    return PatientOutcome(p.subject_id, p.dose_level, p.cohort, letter, status), known_at


@dataclass
class TrialState:
    cohorts: list[Cohort]
    patients: list[PatientOutcome]
    level: int | None  # the level under review (of the newest cohort)
    ready: bool
    early_stop: bool
    basis_at: dt.datetime | None
    pending: list[str] = field(default_factory=list)
    recommendation: Decision | None = None
    undosed: dict[int, list[str]] = field(default_factory=dict)  # level -> patients on study not yet given an NK infusion

    @property
    def history(self) -> str:
        return " ".join(f"{c.dose_level}{c.outcomes}" for c in self.cohorts)


def cohort_state(design: Design, records: list[PatientRecord]) -> TrialState:
    """The outcome history as 3+3 sees it (patients in enrollment order), whether the newest cohort
    is ready for review (every window closed with a full cohort evaluable, or a second DLT), and the rule's advice."""
    groups: dict[tuple[int, int], list[PatientOutcome]] = defaultdict(list)
    basis: dict[tuple[int, int], list[dt.datetime]] = defaultdict(list)
    for record in records:
        outcome, known_at = patient_outcome(record)
        groups[(record.dose_level, record.cohort)].append(outcome)
        if outcome.letter:
            basis[(record.dose_level, record.cohort)].append(known_at)
    order = list(groups)
    if not order:
        return TrialState([], [], None, False, False, None, recommendation=design.decide([]))
    cohorts = [Cohort(lvl, "".join(p.letter for p in groups[(lvl, c)] if p.letter)) for lvl, c in order]
    level, last = order[-1][0], groups[order[-1]]
    pending = [p.subject_id for p in last if p.letter is None and p.status == WINDOW_OPEN]
    early = too_toxic(sum(c.dlts for c in cohorts if c.dose_level == level))
    ready = early or (not pending and sum(1 for p in last if p.letter) >= design.cohort_size)
    complete = [c for c in cohorts if c.outcomes]
    decision = design.decide(complete) if ready else None
    basis_at = max((t for key in order if key[0] == level for t in basis[key]), default=None) if ready else None
    return TrialState(complete, [p for key in order for p in groups[key]], level, ready, early, basis_at, pending, decision)


# -- what the PI may sign --------------------------------------------------------------------------

def refuse_bolder(recommended: Action, action: Action) -> str | None:
    """The sentence refusing a choice bolder than the rule's recommendation, or None."""
    if BOLDNESS[action] > BOLDNESS[recommended]:
        return (f"decision '{action.value}' is bolder than the 3+3 recommendation '{recommended.value}'; "
                "choose it or a more cautious action")
    return None


def _impossible(recommended: Action, from_level: int, early_stop: bool, action: Action) -> str | None:
    if action in (Action.EXPAND, Action.ENROLL) and (recommended is Action.DEESCALATE or early_stop):
        return f"level {from_level} is too toxic; it cannot take more patients"
    if action is Action.DEESCALATE and from_level <= 1:
        return "there is no level below 1 to de-escalate to; choose stop"
    return None


def allowed_choices(recommended: Action, from_level: int, early_stop: bool) -> dict[Action, str | None]:
    """Each action → None when the PI may sign it, else the sentence that refuses it. The PI may take
    the recommendation or a more cautious action, never a bolder one, and never more patients at a
    level too toxic or a level below 1."""
    return {a: refuse_bolder(recommended, a) or _impossible(recommended, from_level, early_stop, a) for a in Action}


def chosen_level(action: Action, *, recommended_level: int | None, from_level: int) -> int | None:
    """The level a signed action opens (None for stop)."""
    match action:
        case Action.ESCALATE:
            return recommended_level
        case Action.EXPAND | Action.ENROLL:
            return from_level
        case Action.DEESCALATE:
            return from_level - 1
        case Action.STOP:
            return None


def check_choice(*, decision_id: int, recommended: Action, recommended_level: int | None, from_level: int, early_stop: bool,
                 prepared_history: str, current_history: str, action: Action, rationale: str | None) -> int | None:
    """The level the PI's choice opens, or a UserError with the sentence that refuses it: a bolder
    choice than the rule; a cautious one without a rationale; outcomes changed since the review was
    prepared; more patients at a level too toxic; no level below 1."""
    if bold := refuse_bolder(recommended, action):
        raise UserError(bold)
    if action is not recommended and not (rationale or "").strip():
        raise UserError(f"rationale is required when choosing '{action.value}' over the recommendation '{recommended.value}'")
    if current_history != prepared_history:
        raise UserError(f"decision {decision_id} was prepared for history '{prepared_history}', but the outcomes are now "
                        f"'{current_history}'; a new review is needed")
    if refused := _impossible(recommended, from_level, early_stop, action):
        raise UserError(refused)
    return chosen_level(action, recommended_level=recommended_level, from_level=from_level)


def declared_mtd(recommended: Action, action: Action, mtd: int | None) -> int | None:
    """The MTD a signed decision declares: the rule's, when both the rule and the PI stop; a PI's early stop declares none."""
    return mtd if (action is Action.STOP and recommended is Action.STOP) else None


# -- what a signed decision closes for patients not yet dosed ---------------------------------------

def levels_closed_to_undosed(action: Action, *, from_level: int, num_levels: int) -> tuple[int, ...]:
    """The dose levels at which a signed action ends dosing for patients enrolled but not yet dosed
    (no NK infusion given). An assumption on INTERPRETATION.md, "Dose escalation: classical 3+3":

    - stop: every level. Nobody more is dosed; the trial ends.
    - de-escalate: the level de-escalated from. It is too toxic, so no new patient receives it; a
      patient waiting there is not moved to the level below (that would be a new enrollment).
    - escalate, expand: none. An escalation needs every patient of the level through their DLT
      window, so nobody waits there undosed; an expansion keeps the level open.

    A patient already dosed stays in the tally and keeps their whole follow-up (DLT window, IL-2,
    visits, PK samples) and their remaining infusion; the investigator may take them off study.
    """
    match action:
        case Action.STOP:
            return tuple(range(1, num_levels + 1))
        case Action.DEESCALATE:
            return (from_level,)
        case _:
            return ()


def not_dosed_words(action: Action, *, dose_level: int) -> str:
    """A not-dosed patient's status in words, e.g. "not dosed: trial stopped"."""
    if action is Action.STOP:
        return "not dosed: trial stopped"
    return f"not dosed: DL{dose_level} closed after de-escalation"
