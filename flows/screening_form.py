"""The enroll-patient form as the protocol's screening checklist, converted to a `ScreeningRecord`.

Prefect's UI renders each nested model as a section and each field with its title and description.
Every field is titled with the criterion in words, its unit and its limit, taken from the protocol
file. No field offers a type switch: a yes/no fact is a select of yes / no / unknown (unknown by
default); a number, a date or a last-therapy date is one plain input, and empty means unknown. A
last-therapy date takes `YYYY-MM-DD` or the word `never`. What a person types is checked here,
and a mistake is refused in one sentence that names the field.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, create_model

from protocol.eligibility import ScreeningRecord, washout_in_words
from protocol.errors import UserError
from tasks.runtime import protocol

Answer = Literal["yes", "no", "unknown"]
ANSWERS: dict[str, bool | None] = {"yes": True, "no": False, "unknown": None}
DATE_PATTERN = r"^\s*(\d{4}-\d{2}-\d{2})?\s*$"
LAST_ON_PATTERN = r"^\s*(\d{4}-\d{2}-\d{2}|[Nn][Ee][Vv][Ee][Rr])?\s*$"
UNKNOWN_IF_EMPTY = "Leave empty if not known (screening then reports the criterion as unknown)."


def _crit(cid: str):
    return protocol().eligibility.criterion(cid)


def _no_default_in_schema(schema: dict[str, Any]) -> None:
    """Prefect's server accepts null for a non-required field only when its schema has no default."""
    schema.pop("default", None)


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def answer(title: str, description: str) -> Any:
    """A yes / no / unknown select, unknown until someone answers."""
    return Annotated[Answer, Field(default="unknown", title=title, description=description)]


def number(title: str, description: str, *, integer: bool = False, minimum: float = 0, maximum: float | None = None) -> Any:
    """One plain number input; empty is unknown."""
    schema: dict[str, Any] = {"type": "integer" if integer else "number", "title": title,
                              "description": f"{description} {UNKNOWN_IF_EMPTY}", "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    kind = int if integer else float
    return Annotated[kind | None, BeforeValidator(_blank_is_none), WithJsonSchema(schema),
                     Field(default=None, json_schema_extra=_no_default_in_schema)]


def text(title: str, description: str, pattern: str) -> Any:
    """One plain text input (a date, or a date or "never"), checked when the record is built."""
    schema = {"type": "string", "title": title, "description": description, "pattern": pattern}
    return Annotated[str, BeforeValidator(lambda v: "" if v is None else v), WithJsonSchema(schema),
                     Field(default="", json_schema_extra=_no_default_in_schema)]


def _limit(cid: str, key: str) -> Any:
    return getattr(_crit(cid), key)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def is_empty(self) -> bool:
        return self.model_dump() == type(self)().model_dump()


class ConsentAndHistory(_Section):
    """Consent, age, prognosis and performance status (inclusions 1, 2, 3, 6 and 7)."""

    model_config = ConfigDict(title="1. Consent and history")
    consent_on: text("Date informed consent was signed (YYYY-MM-DD)", f"I7: {_crit('I7').text}. {UNKNOWN_IF_EMPTY}",
                     DATE_PATTERN)
    age_years: number(f"Age at consent, years (must be ≥ {_limit('I1', 'min_age_years')})", f"I1: {_crit('I1').text}.",
                      integer=True, maximum=120)
    expected_survival_months: number(f"Expected survival, months (must be ≥ {_limit('I2', 'min_months')})",
                                     f"I2: {_crit('I2').text}.")
    ecog: number(f"ECOG performance status, 0 to 5 (must be ≤ {_limit('I3', 'max_ecog')})", f"I3: {_crit('I3').text}.",
                 integer=True, maximum=5)
    contraception_commitment: answer("Commits to effective contraception (must be yes)",
                                     f"I6: {_crit('I6').text}. E5: {_crit('E5').text}.")


class Disease(_Section):
    """Transplant and disease status after it (inclusion 4 a-b)."""

    model_config = ConfigDict(title="2. Disease after transplant")
    prior_allo_hsct: answer("Had an allogeneic stem-cell transplant (allo-HSCT) (must be yes)", f"I4: {_crit('I4A_B').text}.")
    peripheral_blood_leukaemia_cells: answer("Leukaemia cells in peripheral blood (a sign of relapse)",
                                             "Relapse needs one of: leukaemia cells in blood, marrow blasts above the limit, "
                                             "or extramedullary infiltration. Or MRD-positive.")
    marrow_blasts_percent: number(f"Bone-marrow blasts, % (relapse if ≥ {_limit('I4A_B', 'min_marrow_blasts_percent')} %)",
                                  "Morphology of the bone-marrow aspirate.", maximum=100)
    extramedullary_infiltration: answer("Extramedullary leukaemic infiltration (a sign of relapse)",
                                        "Leukaemia outside blood and marrow.")
    mrd_positive_mfc: answer("MRD-positive by flow cytometry (MFC) on bone-marrow aspirate",
                             "Minimal residual disease; enough on its own when there is no morphological relapse.")


class GvhdAndDonor(_Section):
    """Acute GVHD after transplant and the donor (inclusion 4 c-d)."""

    model_config = ConfigDict(title="3. GVHD and donor")
    agvhd_max_grade_post_transplant: number(
        f"Worst acute GVHD grade after transplant, 0 to 4 (must be ≤ {_limit('I4C', 'max_agvhd_grade')})",
        f"I4C: {_crit('I4C').text}.", integer=True, maximum=4)
    donor_available: answer("Allo-HSCT donor available (must be yes)", f"I4D: {_crit('I4D').text}: the NK cells come from the donor.")


def _lab(name: str, unit: str, cid: str, key: str) -> tuple[Any, Any]:
    limit = f"{_limit(cid, key):g}×ULN"
    return (number(f"{name}, {unit} (must be ≤ {limit})", f"{cid}: {_crit(cid).text}."),
            number(f"{name} upper limit of normal (ULN), same unit", f"The measuring lab's ULN for {name}; the limit is {limit}."))


_ALT, _ALT_ULN = _lab("ALT", "U/L", "I5_LIVER", "alt_max_uln")
_AST, _AST_ULN = _lab("AST", "U/L", "I5_LIVER", "ast_max_uln")
_BILI, _BILI_ULN = _lab("Total bilirubin", "µmol/L or mg/dL", "I5_LIVER", "bilirubin_max_uln")
_INR, _INR_ULN = _lab("INR", "ratio", "I5_COAG", "inr_max_uln")
_APTT, _APTT_ULN = _lab("APTT", "seconds", "I5_COAG", "aptt_max_uln")
_CREA, _CREA_ULN = _lab("Serum creatinine", "µmol/L or mg/dL", "I5_RENAL", "creatinine_max_uln")


class Labs(_Section):
    """Liver and coagulation labs, each with the measuring lab's upper limit of normal (inclusion 5)."""

    model_config = ConfigDict(title="4. Labs: liver and coagulation")
    alt: _ALT
    alt_uln: _ALT_ULN
    ast: _AST
    ast_uln: _AST_ULN
    total_bilirubin: _BILI
    total_bilirubin_uln: _BILI_ULN
    inr: _INR
    inr_uln: _INR_ULN
    aptt: _APTT
    aptt_uln: _APTT_ULN


class OrganFunction(_Section):
    """Kidney and heart (inclusion 5)."""

    model_config = ConfigDict(title="5. Organ function: kidney and heart")
    serum_creatinine: _CREA
    serum_creatinine_uln: _CREA_ULN
    creatinine_clearance_ml_min: number(
        f"Creatinine clearance, mL/min (kidney passes if ≥ {_limit('I5_RENAL', 'min_creatinine_clearance_ml_min')})",
        f"I5: {_crit('I5_RENAL').text}.")
    lvef_percent: number(f"LVEF, % (must be ≥ {_limit('I5_CARDIAC', 'min_lvef_percent')})",
                         f"I5: {_crit('I5_CARDIAC').text}; left-ventricular ejection fraction.", maximum=100)


def _washout_fields() -> dict[str, Any]:
    p = protocol()
    fields: dict[str, Any] = {}
    for w in p.eligibility.washouts:
        fields[w.field] = (text(f"Last {w.label}: YYYY-MM-DD, or never",
                                f"{w.criterion}: day 0 must be {washout_in_words(p, w)} after the last dose. "
                                f"Type never if never given. {UNKNOWN_IF_EMPTY}", LAST_ON_PATTERN))
        if w.half_lives is not None:
            fields["antitumour_half_life_days"] = (number(
                "Half-life of that anti-tumour drug, days",
                f"For the rule {washout_in_words(p, w)}. If empty, the {w.days}-day limit is used where it is the safe one."))
    return fields


class _WashoutSection(_Section):
    model_config = ConfigDict(title="6. Washouts: last dose of each therapy")


class _ExclusionSection(_Section):
    model_config = ConfigDict(title="7. Exclusions")


Washouts = create_model("Washouts", __base__=_WashoutSection, __doc__=f"Last doses before day 0 ({_crit('E2').text}; exclusion 3).",
                        **_washout_fields())

_EXCLUSIONS = {"E1": "cns_involvement", "E4": "hypersensitivity_murine_or_biologics", "E6": "pregnant_or_lactating",
               "E7": "serious_autoimmune_or_immunodeficiency", "E8": "alcohol_or_drug_dependence",
               "E9": "investigator_judges_unsuitable"}
Exclusions = create_model(
    "Exclusions", __base__=_ExclusionSection, __doc__="Each exclusion must be no (exclusion 5 is the contraception answer in section 1).",
    **{field: (answer(f"{_crit(cid).text} (must be no)", f"{cid}: yes excludes the candidate."))
       for cid, field in _EXCLUSIONS.items()})

SECTIONS = {"consent_and_history": ConsentAndHistory, "disease": Disease, "gvhd_and_donor": GvhdAndDonor, "labs": Labs,
            "organ_function": OrganFunction, "washouts": Washouts, "exclusions": Exclusions}
_LAB_PAIRS = {"alt": ("labs", "alt"), "ast": ("labs", "ast"), "total_bilirubin": ("labs", "total_bilirubin"),
              "inr": ("labs", "inr"), "aptt": ("labs", "aptt"), "serum_creatinine": ("organ_function", "serum_creatinine")}
_LAB_FIELDS = {f for _, field in _LAB_PAIRS.values() for f in (field, f"{field}_uln")}


def _title(section: type[BaseModel], field: str) -> str:
    schema = section.model_json_schema()
    return f"{schema.get('title', section.__name__)} · {schema['properties'][field]['title']}"


def _date(section: type[BaseModel], field: str, value: str, *, never: bool) -> dt.date | str | None:
    typed = value.strip()
    if not typed:
        return None
    if never and typed.lower() == "never":
        return "never"
    try:
        return dt.date.fromisoformat(typed)
    except ValueError:
        rule = "YYYY-MM-DD or never" if never else "YYYY-MM-DD"
        raise UserError(f"{_title(section, field)}: '{typed}' is not a date; write {rule}") from None


def record_from_sections(subject_id: str, sections: dict[str, _Section]) -> dict[str, Any]:
    """The form's sections as a ScreeningRecord's JSON: yes/no/unknown -> true/false/null, empty -> null."""
    data: dict[str, Any] = {"subject_id": subject_id}
    labs: dict[str, Any] = {}
    for name, section in sections.items():
        cls = type(section)
        for field, value in section:
            if field in _LAB_FIELDS:
                continue
            if field == "creatinine_clearance_ml_min":
                labs[field] = value
            elif field == "consent_on":
                data[field] = _date(cls, field, value, never=False)
            elif field.startswith("last_"):
                data[field] = _date(cls, field, value, never=True)
            elif value in ANSWERS:
                data[field] = ANSWERS[value]
            else:
                data[field] = value
    for lab, (name, field) in _LAB_PAIRS.items():
        section = sections[name]
        value, uln = getattr(section, field), getattr(section, f"{field}_uln")
        if (value is None) != (uln is None):
            missing = f"{field}_uln" if uln is None else field
            raise UserError(f"{_title(type(section), missing)}: give the value and its upper limit of normal together, or neither")
        if uln is not None and uln <= 0:
            raise UserError(f"{_title(type(section), f'{field}_uln')}: the upper limit of normal must be above 0")
        labs[lab] = None if value is None else {"value": value, "uln": uln}
    data["labs"] = labs
    return data


def validated(data: dict[str, Any] | str, *, what: str) -> ScreeningRecord:
    """A ScreeningRecord, or one sentence naming the first field that is wrong."""
    try:
        return ScreeningRecord.model_validate_json(data) if isinstance(data, str) else ScreeningRecord.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "the record"
        raise UserError(f"{what}: {where}: {err['msg']}") from None


def json_record(subject_id: str, typed: str) -> ScreeningRecord:
    """A screening record pasted as JSON; its subject_id, if it has one, must be the form's."""
    try:
        data = json.loads(typed)
    except json.JSONDecodeError as exc:
        raise UserError(f"screening record (JSON): not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise UserError("screening record (JSON): must be one JSON object, like examples/screening-S-001.json")
    if data.setdefault("subject_id", subject_id) != subject_id:
        raise UserError(f"screening record (JSON): its subject_id {data['subject_id']} is not the form's subject ID {subject_id}")
    return validated(data, what="screening record (JSON)")
