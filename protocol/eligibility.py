"""Eligibility screening: a pure function from a screening record to a per-criterion report.

Missing data makes a criterion `unknown`, never `met`. Status says whether the criterion's own
condition holds: an inclusion must be `met`, an exclusion must be `not_met`. The washouts give
the earliest permissible day 0.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.dates import add_months
from protocol.definition import Criterion, ProtocolDefinition, Washout
from protocol.errors import UserError

Never = Literal["never"]


class Status(StrEnum):
    MET = "met"
    NOT_MET = "not_met"
    UNKNOWN = "unknown"


class Verdict(StrEnum):
    ELIGIBLE = "eligible"
    NOT_ELIGIBLE = "not_eligible"
    INCOMPLETE = "incomplete"


class Lab(BaseModel):
    """A lab value with the upper limit of normal of the lab that measured it."""

    model_config = ConfigDict(extra="forbid")
    value: float = Field(ge=0)
    uln: float = Field(gt=0)


class Labs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alt: Lab | None = None
    ast: Lab | None = None
    total_bilirubin: Lab | None = None
    inr: Lab | None = None
    aptt: Lab | None = None
    serum_creatinine: Lab | None = None
    creatinine_clearance_ml_min: float | None = Field(default=None, ge=0)


class ScreeningRecord(BaseModel):
    """What screening collects for one candidate. Pseudonymous: a subject ID, never a name.

    Booleans and values left out are `unknown`. A last-therapy date is a date, or "never".
    """

    model_config = ConfigDict(extra="forbid")
    subject_id: str = Field(min_length=1, max_length=32)
    consent_on: dt.date | None = None
    age_years: int | None = Field(default=None, ge=0, le=120)
    expected_survival_months: float | None = Field(default=None, ge=0)
    ecog: int | None = Field(default=None, ge=0, le=5)
    prior_allo_hsct: bool | None = None
    peripheral_blood_leukaemia_cells: bool | None = None
    marrow_blasts_percent: float | None = Field(default=None, ge=0, le=100)
    extramedullary_infiltration: bool | None = None
    mrd_positive_mfc: bool | None = None
    agvhd_max_grade_post_transplant: int | None = Field(default=None, ge=0, le=4)
    donor_available: bool | None = None
    labs: Labs = Labs()
    lvef_percent: float | None = Field(default=None, ge=0, le=100)
    contraception_commitment: bool | None = None
    cns_involvement: bool | None = None
    hypersensitivity_murine_or_biologics: bool | None = None
    pregnant_or_lactating: bool | None = None
    serious_autoimmune_or_immunodeficiency: bool | None = None
    alcohol_or_drug_dependence: bool | None = None
    investigator_judges_unsuitable: bool | None = None
    last_systemic_steroid_on: dt.date | Never | None = None
    last_antitumour_therapy_on: dt.date | Never | None = None
    antitumour_half_life_days: float | None = Field(default=None, gt=0)
    last_radiotherapy_on: dt.date | Never | None = None
    last_dli_on: dt.date | Never | None = None
    last_intrathecal_on: dt.date | Never | None = None
    last_modified_cell_therapy_on: dt.date | Never | None = None
    last_iv_anti_infective_on: dt.date | Never | None = None


class CriterionResult(BaseModel):
    id: str
    kind: Literal["inclusion", "exclusion"]
    text: str
    status: Status
    value: str
    limit: str
    reason: str

    @property
    def allows_enrollment(self) -> bool | None:
        """True if this criterion lets the patient in, False if it keeps them out, None if unknown."""
        if self.status is Status.UNKNOWN:
            return None
        return (self.status is Status.MET) == (self.kind == "inclusion")


class ScreeningResult(BaseModel):
    subject_id: str
    protocol_version: str
    verdict: Verdict
    day0_on: dt.date | None
    earliest_day0_on: dt.date | None
    earliest_day0_is_lower_bound: bool
    criteria: list[CriterionResult]

    @property
    def failing(self) -> list[CriterionResult]:
        return [c for c in self.criteria if c.allows_enrollment is False]

    @property
    def unknown(self) -> list[CriterionResult]:
        return [c for c in self.criteria if c.allows_enrollment is None]


def _tri(*values: bool | None) -> Status:
    """All true: met; any false: not met; otherwise unknown."""
    if any(v is False for v in values):
        return Status.NOT_MET
    if all(v is True for v in values):
        return Status.MET
    return Status.UNKNOWN


def _any(*values: bool | None) -> Status:
    """Any true: met; all false: not met; otherwise unknown."""
    if any(v is True for v in values):
        return Status.MET
    if all(v is False for v in values):
        return Status.NOT_MET
    return Status.UNKNOWN


def _as_bool(status: Status) -> bool | None:
    return {Status.MET: True, Status.NOT_MET: False, Status.UNKNOWN: None}[status]


def _fmt(v: object) -> str:
    return "missing" if v is None else ("yes" if v is True else "no" if v is False else str(v))


def _ratio(lab: Lab | None, limit: float) -> tuple[bool | None, str]:
    if lab is None:
        return None, "missing"
    ratio = lab.value / lab.uln
    return ratio <= limit, f"{lab.value:g} (ULN {lab.uln:g}, {ratio:.2f}×ULN)"


class _Screen:
    def __init__(self, protocol: ProtocolDefinition, rec: ScreeningRecord, day0_on: dt.date | None):
        self.p, self.rec, self.day0_on = protocol, rec, day0_on
        self.results: list[CriterionResult] = []

    def add(self, c: Criterion, status: Status, value: str, limit: str, reason: str) -> None:
        kind = "inclusion" if c in self.p.eligibility.inclusion else "exclusion"
        self.results.append(CriterionResult(id=c.id, kind=kind, text=c.text, status=status, value=value, limit=limit, reason=reason))

    def flag(self, cid: str, field: str) -> None:
        """An exclusion that is one yes/no fact on the record."""
        c = self.p.eligibility.criterion(cid)
        v = getattr(self.rec, field)
        status = Status.UNKNOWN if v is None else Status.MET if v else Status.NOT_MET
        why = {Status.UNKNOWN: "not recorded", Status.MET: "present: excludes", Status.NOT_MET: "absent"}[status]
        self.add(c, status, _fmt(v), "must be absent", why)


def washout_days(w: Washout, rec: ScreeningRecord, last_on: dt.date) -> tuple[int | None, str]:
    """Length of one washout in days from its last date, and how it was reached."""
    if w.months is not None:
        return (add_months(last_on, w.months) - last_on).days, f"{w.months} months"
    days = w.days
    if w.half_lives is None:
        return days, f"{days} days"
    hl = rec.antitumour_half_life_days
    if hl is None:
        if w.rule == "shorter":
            return days, f"{days} days (half-life not recorded; the {days}-day limit is never shorter than the rule)"
        return None, f"the longer of {days} days or {w.half_lives} half-lives, but the half-life is not recorded"
    by_hl = math.ceil(w.half_lives * hl)
    chosen = min(days, by_hl) if w.rule == "shorter" else max(days, by_hl)
    return chosen, f"{chosen} days, the {w.rule} of {days} days and {w.half_lives} × {hl:g}-day half-life ({by_hl} days)"


def screen(protocol: ProtocolDefinition, rec: ScreeningRecord, *, day0_on: dt.date | None = None) -> ScreeningResult:
    """Screen one candidate against the protocol's inclusion and exclusion criteria."""
    pattern = protocol.site.subject_id_pattern.value
    if not re.fullmatch(pattern, rec.subject_id):
        raise UserError(f"subject_id '{rec.subject_id}' must match the pseudonymous pattern {pattern} (for example S-003), never a name")
    if day0_on is not None and rec.consent_on is not None and day0_on < rec.consent_on:
        raise UserError(f"day0 {day0_on} is before consent_on {rec.consent_on}; day 0 must be on or after consent")
    s = _Screen(protocol, rec, day0_on)
    el = protocol.eligibility
    crit = el.criterion

    c = crit("I1")
    s.add(c, Status.UNKNOWN if rec.age_years is None else _tri(rec.age_years >= c.min_age_years),
          _fmt(rec.age_years), f"≥ {c.min_age_years} years at consent", "age at consent")
    c = crit("I2")
    v = rec.expected_survival_months
    s.add(c, Status.UNKNOWN if v is None else _tri(v >= c.min_months), _fmt(v), f"≥ {c.min_months} months", "investigator attestation")
    c = crit("I3")
    s.add(c, Status.UNKNOWN if rec.ecog is None else _tri(rec.ecog <= c.max_ecog), _fmt(rec.ecog), f"0 to {c.max_ecog}", "ECOG performance status")

    c = crit("I4A_B")
    blasts = None if rec.marrow_blasts_percent is None else rec.marrow_blasts_percent >= c.min_marrow_blasts_percent
    relapse = _any(rec.peripheral_blood_leukaemia_cells, blasts, rec.extramedullary_infiltration)
    status = _tri(rec.prior_allo_hsct, _as_bool(_any(_as_bool(relapse), rec.mrd_positive_mfc)))
    s.add(c, status,
          f"allo-HSCT={_fmt(rec.prior_allo_hsct)}, PB leukaemia cells={_fmt(rec.peripheral_blood_leukaemia_cells)}, "
          f"marrow blasts={_fmt(rec.marrow_blasts_percent)}%, extramedullary={_fmt(rec.extramedullary_infiltration)}, "
          f"MRD+ (MFC)={_fmt(rec.mrd_positive_mfc)}",
          f"allo-HSCT and (relapse: marrow blasts ≥ {c.min_marrow_blasts_percent}% or PB/extramedullary disease; or MRD+)",
          "disease status after transplant")
    c = crit("I4C")
    g = rec.agvhd_max_grade_post_transplant
    s.add(c, Status.UNKNOWN if g is None else _tri(g <= c.max_agvhd_grade), _fmt(g), f"grade ≤ {c.max_agvhd_grade}", "worst acute GVHD after transplant")
    c = crit("I4D")
    s.add(c, _tri(rec.donor_available), _fmt(rec.donor_available), "donor available", "NK cells come from the transplant donor")

    labs = rec.labs
    c = crit("I5_LIVER")
    checks = [("ALT", labs.alt, c.alt_max_uln), ("AST", labs.ast, c.ast_max_uln), ("bilirubin", labs.total_bilirubin, c.bilirubin_max_uln)]
    oks, vals = zip(*[_ratio(lab, lim) for _, lab, lim in checks])
    s.add(c, _tri(*oks), "; ".join(f"{n} {v}" for (n, _, _), v in zip(checks, vals)),
          f"ALT ≤ {c.alt_max_uln:g}×ULN, AST ≤ {c.ast_max_uln:g}×ULN, bilirubin ≤ {c.bilirubin_max_uln:g}×ULN", "liver function")
    c = crit("I5_COAG")
    (inr_ok, inr_v), (aptt_ok, aptt_v) = _ratio(labs.inr, c.inr_max_uln), _ratio(labs.aptt, c.aptt_max_uln)
    measured = [ok for ok in (inr_ok, aptt_ok) if ok is not None]
    status = Status.UNKNOWN if not measured else _tri(*measured)
    s.add(c, status, f"INR {inr_v}; APTT {aptt_v}", f"each measured ≤ {c.inr_max_uln:g}×ULN, at least one measured", "coagulation")
    c = crit("I5_RENAL")
    cr_ok, cr_v = _ratio(labs.serum_creatinine, c.creatinine_max_uln)
    crcl = labs.creatinine_clearance_ml_min
    crcl_ok = None if crcl is None else crcl >= c.min_creatinine_clearance_ml_min
    s.add(c, _any(cr_ok, crcl_ok), f"creatinine {cr_v}; CrCl {_fmt(crcl)} mL/min",
          f"creatinine ≤ {c.creatinine_max_uln:g}×ULN or CrCl ≥ {c.min_creatinine_clearance_ml_min} mL/min", "renal function")
    c = crit("I5_CARDIAC")
    v = rec.lvef_percent
    s.add(c, Status.UNKNOWN if v is None else _tri(v >= c.min_lvef_percent), "missing" if v is None else f"{v:g}%",
          f"≥ {c.min_lvef_percent}%", "cardiac function")
    c = crit("I6")
    s.add(c, _tri(rec.contraception_commitment), _fmt(rec.contraception_commitment), "committed", "for 12 months after infusion")
    c = crit("I7")
    s.add(c, Status.MET if rec.consent_on else Status.UNKNOWN, _fmt(rec.consent_on), "signed consent date", "informed consent")

    s.flag("E1", "cns_involvement")
    earliest, lower_bound = _washouts(s, protocol, rec, day0_on)
    s.flag("E4", "hypersensitivity_murine_or_biologics")
    c = crit("E5")
    v = rec.contraception_commitment
    s.add(c, Status.UNKNOWN if v is None else Status.NOT_MET if v else Status.MET, f"commits to contraception: {_fmt(v)}",
          "must be able to commit", "same fact as inclusion 6")
    s.flag("E6", "pregnant_or_lactating")
    s.flag("E7", "serious_autoimmune_or_immunodeficiency")
    s.flag("E8", "alcohol_or_drug_dependence")
    s.flag("E9", "investigator_judges_unsuitable")

    allows = [r.allows_enrollment for r in s.results]
    verdict = Verdict.NOT_ELIGIBLE if False in allows else Verdict.INCOMPLETE if None in allows else Verdict.ELIGIBLE
    order = {c.id: i for i, c in enumerate([*el.inclusion, *el.exclusion])}
    s.results.sort(key=lambda r: order[r.id.split(".")[0]])
    return ScreeningResult(
        subject_id=rec.subject_id, protocol_version=protocol.version, verdict=verdict, day0_on=day0_on,
        earliest_day0_on=earliest, earliest_day0_is_lower_bound=lower_bound, criteria=s.results,
    )


def _washouts(s: _Screen, protocol: ProtocolDefinition, rec: ScreeningRecord, day0_on: dt.date | None) -> tuple[dt.date | None, bool]:
    """One row per washout (as exclusion 2.x / 3), and the earliest permissible day 0."""
    gap = 1 if protocol.eligibility.washout_boundary.value == "inclusive" else 0
    bounds = [rec.consent_on] if rec.consent_on else []
    incomplete = rec.consent_on is None
    for w in protocol.eligibility.washouts:
        c = protocol.eligibility.criterion(w.criterion)
        last = getattr(rec, w.field)
        if last is None:
            incomplete = True
            s.add(c, Status.UNKNOWN, "last date missing", w.label, f"{w.label}: give the last date, or \"never\"")
            continue
        if last == "never":
            s.add(c, Status.NOT_MET, "never", w.label, f"{w.label}: never received")
            continue
        days, how = washout_days(w, rec, last)
        if days is None:
            incomplete = True
            s.add(c, Status.UNKNOWN, f"last on {last}", how, f"{w.label}: {how}")
            continue
        clear_on = last + dt.timedelta(days=days + gap)
        bounds.append(clear_on)
        relation = "more than" if gap else "at least"
        limit = f"day 0 on or after {clear_on} ({relation} {how} after {last})"
        if day0_on is None:
            s.add(c, Status.NOT_MET, f"last on {last}", limit, f"{w.label}: clear from {clear_on}")
        elif day0_on < clear_on:
            s.add(c, Status.MET, f"last on {last}, day 0 {day0_on}", limit, f"{w.label}: day 0 {day0_on} is within the washout; clear from {clear_on}")
        else:
            s.add(c, Status.NOT_MET, f"last on {last}, day 0 {day0_on}", limit, f"{w.label}: washed out by day 0")
    s.results[-len(protocol.eligibility.washouts):] = [
        r.model_copy(update={"id": f"{r.id}.{w.id}"}) for r, w in zip(s.results[-len(protocol.eligibility.washouts):], protocol.eligibility.washouts)
    ]
    return (max(bounds) if bounds else None), incomplete


# -- words: what a person reads on the form and in the screening artifact (no decision here) --------------------


def washout_in_words(protocol: ProtocolDefinition, w: Washout) -> str:
    """How long before day 0 the last dose must be, in words from the protocol file, e.g. 'more than 3 days'."""
    relation = "more than" if protocol.eligibility.washout_boundary.value == "inclusive" else "at least"
    if w.months is not None:
        return f"{relation} {w.months} months"
    if w.half_lives is not None:
        return f"{relation} the {w.rule} of {w.days} days or {w.half_lives} half-lives"
    return f"{relation} {w.days} days"


def criterion_in_words(c: CriterionResult) -> str:
    """A criterion as a coordinator reads it: the protocol's text, what a washout row is about, and its ID."""
    if "." in c.id:  # a washout row (E2.<washout>, E3.<washout>): name the therapy, which the reason starts with
        return f"{c.text}: {c.reason.split(':')[0]} ({c.id})"
    return f"{c.text} ({c.id})"


def status_in_words(c: CriterionResult) -> str:
    """MET / NOT MET / UNKNOWN, and whether that lets the candidate in: plain words, no symbols a browser may lack."""
    word = c.status.value.replace("_", " ").upper()
    effect = {True: "passes", False: "keeps the candidate out", None: "data missing"}[c.allows_enrollment]
    return f"{word}, {effect}"
