"""Is an adverse event a candidate DLT? A pure screen against the protocol's DLT rules.

The system flags candidates; the investigator's adjudication is what counts. When a rule needs
a fact not yet known (how long a cytopenia lasted, whether an infusion reaction resolved), the
event is `needs_information`, never silently `not_candidate`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from protocol.definition import DltRules


class AeCategory(StrEnum):
    NON_HAEMATOLOGICAL = "non_haematological"
    NEUTROPENIA = "neutropenia"
    THROMBOCYTOPENIA = "thrombocytopenia"
    OTHER_HAEMATOLOGICAL = "other_haematological"
    ACUTE_GVHD = "acute_gvhd"
    CRS = "crs"
    ICANS = "icans"
    INFUSION_REACTION = "infusion_reaction"
    FEVER = "fever"


class Attribution(StrEnum):
    UNRELATED = "unrelated"
    UNLIKELY = "unlikely"
    POSSIBLE = "possible"
    PROBABLE = "probable"
    DEFINITE = "definite"


_ATTRIBUTION_RANK = {a: i for i, a in enumerate(Attribution)}


class DltScreen(StrEnum):
    CANDIDATE = "candidate"
    NOT_CANDIDATE = "not_candidate"
    NEEDS_INFORMATION = "needs_information"


@dataclass(frozen=True)
class AeFacts:
    category: AeCategory
    grade: int  # CTCAE 1–5; acute GVHD uses its overall grade I–IV as 1–4
    onset_on: dt.date
    attribution: Attribution
    resolved_to_grade_1_within_72h: bool | None = None  # infusion reactions
    duration_days: int | None = None  # cytopenias
    caused_by_leukaemia: bool | None = None  # cytopenias
    caused_by_progression: bool | None = None  # grade 5


@dataclass(frozen=True)
class DltResult:
    screen: DltScreen
    rule: str


def screen_dlt(rules: DltRules, ae: AeFacts, *, window_start_on: dt.date, window_end_on: dt.date) -> DltResult:
    """Screen one AE; `window_*` are the local dates the patient's DLT window spans (inclusive)."""
    if not window_start_on <= ae.onset_on <= window_end_on:
        return DltResult(DltScreen.NOT_CANDIDATE, f"onset {ae.onset_on} is outside the DLT window {window_start_on} to {window_end_on}")
    if _ATTRIBUTION_RANK[ae.attribution] < _ATTRIBUTION_RANK[Attribution(rules.minimum_attribution)]:
        return DltResult(DltScreen.NOT_CANDIDATE, f"attribution '{ae.attribution.value}' is below '{rules.minimum_attribution}'")
    if ae.grade == 5:
        if ae.caused_by_progression is None:
            return DltResult(DltScreen.NEEDS_INFORMATION, "grade 5: record whether disease progression clearly caused it")
        if not ae.caused_by_progression:
            return DltResult(DltScreen.CANDIDATE, "grade 5 AE not clearly caused by disease progression")
        return DltResult(DltScreen.NOT_CANDIDATE, "grade 5 AE clearly caused by disease progression")
    match ae.category:
        case AeCategory.ACUTE_GVHD:
            return _at_least(ae.grade, rules.agvhd_min_grade, "acute GVHD grade III–IV")
        case AeCategory.CRS:
            return _at_least(ae.grade, rules.crs_min_grade, f"CRS grade ≥ {rules.crs_min_grade} (ASTCT)")
        case AeCategory.ICANS:
            return _at_least(ae.grade, rules.icans_min_grade, f"ICANS grade ≥ {rules.icans_min_grade} (ASTCT)")
        case AeCategory.NEUTROPENIA | AeCategory.THROMBOCYTOPENIA:
            c = rules.cytopenia
            if ae.grade < c.min_grade:
                return DltResult(DltScreen.NOT_CANDIDATE, f"cytopenia grade {ae.grade} is below {c.min_grade}")
            if ae.duration_days is None or ae.caused_by_leukaemia is None:
                return DltResult(DltScreen.NEEDS_INFORMATION, f"grade {ae.grade} {ae.category.value}: record its duration and whether leukaemia caused it")
            if ae.duration_days > c.more_than_days and not ae.caused_by_leukaemia:
                return DltResult(DltScreen.CANDIDATE, f"grade {ae.grade} {ae.category.value} lasting {ae.duration_days} days, not caused by leukaemia")
            return DltResult(DltScreen.NOT_CANDIDATE, f"cytopenia lasting {ae.duration_days} days or caused by leukaemia")
        case AeCategory.OTHER_HAEMATOLOGICAL:
            return DltResult(DltScreen.NOT_CANDIDATE, "haematological AE other than grade 4 neutropenia or thrombocytopenia")
    if ae.grade < rules.non_haematological_min_grade:
        return DltResult(DltScreen.NOT_CANDIDATE, f"grade {ae.grade} is below {rules.non_haematological_min_grade}")
    if ae.grade == 3:
        for exc in rules.grade3_exceptions:
            if exc.category != ae.category.value:
                continue
            if exc.resolves_to_grade_at_most is None:
                return DltResult(DltScreen.NOT_CANDIDATE, f"grade 3 {ae.category.value} is excepted")
            if ae.resolved_to_grade_1_within_72h is None:
                return DltResult(DltScreen.NEEDS_INFORMATION, "grade 3 infusion reaction: record whether it resolved to grade ≤ 1 within 72 h")
            if ae.resolved_to_grade_1_within_72h:
                return DltResult(DltScreen.NOT_CANDIDATE, "grade 3 infusion reaction resolved to grade ≤ 1 within 72 h")
    return DltResult(DltScreen.CANDIDATE, f"grade {ae.grade} non-haematological toxicity")


def _at_least(grade: int, minimum: int, rule: str) -> DltResult:
    if grade >= minimum:
        return DltResult(DltScreen.CANDIDATE, rule)
    return DltResult(DltScreen.NOT_CANDIDATE, f"grade {grade} is below the rule: {rule}")
