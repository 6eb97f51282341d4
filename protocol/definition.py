"""The protocol file as validated pydantic models.

Everything clinical the code needs is read from here; the YAML file beside this module is the
trial as data. Each value carries its `source` (registry or assumption) so a PI can see what to
confirm. Loading a malformed or inconsistent file raises ProtocolFileError naming the key.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.errors import ProtocolFileError, first_validation_error
from protocol.roles import Act, Role
from protocol.sourced import Source, Sourced, Sourcing, _Strict

DEFAULT_PROTOCOL_FILE = Path(__file__).with_name("nct06641648.yaml")

class ProtocolId(_Strict):
    trial_id: str
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    title: str


class Site(_Strict):
    timezone: Sourced[str]
    default_event_time: Sourced[str]
    subject_id_pattern: Sourced[str]

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: Sourced[str]) -> Sourced[str]:
        try:
            zoneinfo.ZoneInfo(v.value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"'{v.value}' is not a known IANA timezone (e.g. Asia/Shanghai)") from None
        return v

    @field_validator("default_event_time")
    @classmethod
    def _hh_mm(cls, v: Sourced[str]) -> Sourced[str]:
        try:
            dt.time.fromisoformat(v.value)
        except ValueError:
            raise ValueError(f"'{v.value}' is not a time of day in HH:MM form") from None
        return v

    @field_validator("subject_id_pattern")
    @classmethod
    def _regex(cls, v: Sourced[str]) -> Sourced[str]:
        try:
            re.compile(v.value)
        except re.error as exc:
            raise ValueError(f"'{v.value}' is not a valid regular expression ({exc})") from None
        return v

    @property
    def event_time(self) -> dt.time:
        return dt.time.fromisoformat(self.default_event_time.value)


class DoseLevel(_Strict):
    level: int = Field(ge=1)
    cells_per_infusion: float = Field(gt=0)


class DoseLevels(Sourcing):
    levels: list[DoseLevel] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> DoseLevels:
        for i, lvl in enumerate(self.levels, start=1):
            if lvl.level != i:
                raise ValueError(f"levels[{i - 1}].level is {lvl.level}; levels must be numbered 1, 2, 3, ... in order")
        for a, b in zip(self.levels, self.levels[1:]):
            if b.cells_per_infusion <= a.cells_per_infusion:
                raise ValueError(
                    f"levels[{b.level - 1}].cells_per_infusion must be greater than level {a.level}'s "
                    f"({b.cells_per_infusion:g} ≤ {a.cells_per_infusion:g}); dose levels must increase"
                )
        return self


class Window(_Strict):
    """Tolerance around a target day: [day - minus_days, day + plus_days]."""

    minus_days: int = Field(ge=0, description="negative would exclude the target day")
    plus_days: int = Field(ge=0, description="negative would exclude the target day")
    source: Source = Source.ASSUMPTION
    basis: str = ""


class Infusion(_Strict):
    number: int = Field(ge=1)
    day: int = Field(ge=0)
    window: Window


class NkInfusions(Sourcing):
    infusions: list[Infusion] = Field(min_length=1)
    product_request_lead_days: Sourced[int]
    cells_tolerance_percent: Sourced[float]
    route: Sourced[str]

    @model_validator(mode="after")
    def _plan(self) -> NkInfusions:
        if self.infusions[0].day != 0 or self.infusions[0].window.minus_days or self.infusions[0].window.plus_days:
            raise ValueError("infusions[0] must be day 0 with a 0/0 window: day 0 is defined as the day of infusion 1")
        for i, inf in enumerate(self.infusions, start=1):
            if inf.number != i:
                raise ValueError(f"infusions[{i - 1}].number is {inf.number}; infusions must be numbered 1, 2, ... in order")
        for a, b in zip(self.infusions, self.infusions[1:]):
            if b.day - b.window.minus_days <= a.day + a.window.plus_days:
                raise ValueError(
                    f"infusions[{b.number - 1}] window starts on day {b.day - b.window.minus_days}, "
                    f"not after infusion {a.number}'s window; infusions must not overlap"
                )
        if self.product_request_lead_days.value < 0:
            raise ValueError("product_request_lead_days must be 0 or more")
        if not 0 <= self.cells_tolerance_percent.value <= 100:
            raise ValueError("cells_tolerance_percent must be between 0 and 100")
        return self


class Il2(_Strict):
    dose_miu: Sourced[float]
    route: Sourced[str]
    doses_per_day: Sourced[int]
    duration_days: Sourced[int]
    first_day: Sourced[int]

    @model_validator(mode="after")
    def _positive(self) -> Il2:
        if self.dose_miu.value <= 0:
            raise ValueError("dose_miu must be greater than 0")
        if self.duration_days.value < 1:
            raise ValueError("duration_days must be at least 1")
        if self.first_day.value < 0:
            raise ValueError("first_day must be day 0 or later")
        if self.doses_per_day.value != 1:
            raise ValueError("doses_per_day must be 1: the calendar schedules one IL-2 dose a day")
        return self

    @property
    def days(self) -> range:
        return range(self.first_day.value, self.first_day.value + self.duration_days.value)


class DltWindow(Sourcing):
    open_day: int = Field(ge=0)
    close_day: int

    @model_validator(mode="after")
    def _order(self) -> DltWindow:
        if self.close_day < self.open_day:
            raise ValueError(f"close_day ({self.close_day}) must not be before open_day ({self.open_day})")
        return self


class Grade3Exception(_Strict):
    category: str
    resolves_to_grade_at_most: int | None = None
    within_hours: int | None = None


class Cytopenia(_Strict):
    categories: list[str]
    min_grade: int = Field(ge=1, le=5)
    more_than_days: int = Field(ge=0)
    excludes_cause: str


class DltRules(Sourcing):
    ctcae_version: str
    minimum_attribution: Literal["unlikely", "possible", "probable", "definite"]
    non_haematological_min_grade: int = Field(ge=1, le=5)
    grade3_exceptions: list[Grade3Exception] = []
    agvhd_min_grade: int = Field(ge=1, le=4)
    crs_min_grade: int = Field(ge=1, le=5)
    icans_min_grade: int = Field(ge=1, le=5)
    cytopenia: Cytopenia
    grade5_excludes_cause: str


class Dlt(_Strict):
    window: DltWindow
    rules: DltRules


class Visit(_Strict):
    kind: Literal["visit_1_month", "visit_3_month"]
    label: str
    day: int = Field(ge=0)
    window: Window
    source: Source
    basis: str = ""
    procedures: list[str] = []


class PkSample(_Strict):
    anchor: Literal["infusion_1", "infusion_2"]
    offset_days: int = Field(ge=0)
    label: str = ""


class PkSamples(Sourcing):
    samples: list[PkSample]


class Contraception(_Strict):
    months_after_last_infusion: Sourced[int]


class Criterion(_Strict):
    model_config = ConfigDict(extra="allow", frozen=True)  # thresholds vary by criterion
    id: str
    text: str
    source: Source


class Washout(_Strict):
    id: str
    criterion: str
    field: str
    label: str
    days: int | None = Field(default=None, ge=0)
    months: int | None = Field(default=None, ge=0)
    half_lives: int | None = Field(default=None, ge=1)
    rule: Literal["shorter", "longer"] | None = None
    source: Source

    @model_validator(mode="after")
    def _one_duration(self) -> Washout:
        if (self.days is None) == (self.months is None):
            raise ValueError(f"washout '{self.id}' needs exactly one of days or months")
        if (self.half_lives is None) != (self.rule is None):
            raise ValueError(f"washout '{self.id}' needs both half_lives and rule, or neither")
        return self


class Eligibility(_Strict):
    washout_boundary: Sourced[Literal["inclusive", "exclusive"]]
    inclusion: list[Criterion]
    exclusion: list[Criterion]
    washouts: list[Washout]

    def criterion(self, cid: str) -> Criterion:
        for c in [*self.inclusion, *self.exclusion]:
            if c.id == cid:
                return c
        raise ProtocolFileError(f"protocol file: eligibility has no criterion '{cid}', which screening needs")


class Escalation(_Strict):
    design: Sourced[Literal["three_plus_three"]]
    cohort_size: Sourced[int]
    max_per_level: Sourced[int]
    target_enrollment: Sourced[int]
    max_enrollment: Sourced[int]
    sentinel_stagger_days: Sourced[int]
    signing_code_valid_hours: Sourced[int]
    signing_max_wrong_codes: Sourced[int]
    signing_lockout_minutes: Sourced[int]
    signature_meanings: Sourced[tuple[str, ...]]

    @model_validator(mode="after")
    def _sizes(self) -> Escalation:
        if self.cohort_size.value < 1:
            raise ValueError("cohort_size must be at least 1")
        if self.max_per_level.value != 2 * self.cohort_size.value:
            raise ValueError("max_per_level must be twice cohort_size under 3+3")
        if self.sentinel_stagger_days.value < 0:
            raise ValueError("sentinel_stagger_days must be 0 or more")
        if not 1 <= self.signing_code_valid_hours.value <= 24 * 14:
            raise ValueError("signing_code_valid_hours must be from 1 to 336 (two weeks)")
        if not 1 <= self.signing_max_wrong_codes.value <= 20:
            raise ValueError("signing_max_wrong_codes must be from 1 to 20")
        if not 1 <= self.signing_lockout_minutes.value <= 24 * 60:
            raise ValueError("signing_lockout_minutes must be from 1 to 1440")
        meanings = self.signature_meanings.value
        if not meanings or any(not 1 <= len(m) <= 120 or ":" not in m for m in meanings):
            raise ValueError("signature_meanings must list at least one meaning, each 'Word: what it means', at most 120 characters")
        return self


class Authority(Sourcing):
    """The delegation-of-authority log: which roles may perform each act that writes to the record."""

    acts: dict[Act, tuple[Role, ...]]

    @model_validator(mode="after")
    def _every_act(self) -> Authority:
        missing = [a.name.lower() for a in Act if not self.acts.get(a)]
        if missing:
            raise ValueError(f"authority.acts gives no role for {', '.join(missing)}")
        return self


class Notifications(Sourcing):
    infusion_prep_lead_days: int = Field(ge=0)
    visit_window_open_reminder: bool
    sae_report_deadline_hours: int = Field(gt=0)
    sae_reminder_before_deadline_hours: int = Field(ge=0)
    stuck_run_minutes: Sourced[int]  # a run Pending or Late longer than this is flagged and rescheduled (tasks.projection)


# The sane range of each kind of protocol value: (largest allowed, why). The loader refuses a file past them.
PROTOCOL_BOUNDS: dict[str, tuple[int, str]] = {
    "protocol_day": (3650, "ten years of follow-up is beyond any Phase I schedule; more is a typing error"),
    "window_days": (90, "a visit window wider than three months no longer pins the visit to its day"),
    "lead_days": (90, "a notice or stagger more than three months ahead of its event is a typing error"),
    "deadline_hours": (24 * 30, "an expedited SAE report is due within days, never more than a month"),
}


class ProtocolDefinition(_Strict):
    """The whole trial protocol, validated."""

    protocol: ProtocolId
    site: Site
    dose_levels: DoseLevels
    nk_infusions: NkInfusions
    il2: Il2
    dlt: Dlt
    visits: list[Visit]
    pk_samples: PkSamples
    contraception: Contraception
    eligibility: Eligibility
    escalation: Escalation
    notifications: Notifications
    authority: Authority

    @model_validator(mode="after")
    def _consistent(self) -> ProtocolDefinition:
        self._sane_ranges()  # first: a value past its bound is a typing error, whatever else it breaks
        last_infusion_day = self.nk_infusions.infusions[-1].day
        anchors = {"infusion_1": 0, "infusion_2": self.nk_infusions.infusions[1].day if len(self.nk_infusions.infusions) > 1 else None}
        for i, s in enumerate(self.pk_samples.samples):
            if anchors[s.anchor] is None:
                raise ValueError(f"pk_samples.samples[{i}].anchor is '{s.anchor}', but the protocol has only one infusion")
        if self.dlt.window.close_day < last_infusion_day:
            raise ValueError(
                f"dlt.window.close_day ({self.dlt.window.close_day}) is before the last infusion (day {last_infusion_day}); "
                "the DLT window must cover every infusion"
            )
        if self.escalation.max_enrollment.value != self.escalation.max_per_level.value * len(self.dose_levels.levels):
            raise ValueError("escalation.max_enrollment must equal max_per_level × the number of dose levels")
        return self

    def _sane_ranges(self) -> None:
        """Every day, window and lead time within the bounds next to the loader (PROTOCOL_BOUNDS): a value past them is a
        typing error, and would put dates past the calendar's end."""
        days = {f"nk_infusions.infusions[{i}].day": x.day for i, x in enumerate(self.nk_infusions.infusions)}
        days |= {f"visits[{i}].day": v.day for i, v in enumerate(self.visits)}
        days |= {"dlt.window.close_day": self.dlt.window.close_day, "il2.first_day": self.il2.first_day.value,
                 "il2 last day": self.il2.first_day.value + self.il2.duration_days.value - 1}
        days |= {f"pk_samples.samples[{i}].offset_days": x.offset_days for i, x in enumerate(self.pk_samples.samples)}
        windows = {f"nk_infusions.infusions[{i}].window": x.window for i, x in enumerate(self.nk_infusions.infusions)}
        windows |= {f"visits[{i}].window": v.window for i, v in enumerate(self.visits)}
        checks = [(name, v, "protocol_day") for name, v in days.items()]
        checks += [(f"{name}.{side}", getattr(w, side), "window_days") for name, w in windows.items() for side in ("minus_days", "plus_days")]
        checks += [("nk_infusions.product_request_lead_days", self.nk_infusions.product_request_lead_days.value, "lead_days"),
                   ("notifications.infusion_prep_lead_days", self.notifications.infusion_prep_lead_days, "lead_days"),
                   ("escalation.sentinel_stagger_days", self.escalation.sentinel_stagger_days.value, "lead_days"),
                   ("notifications.sae_report_deadline_hours", self.notifications.sae_report_deadline_hours, "deadline_hours"),
                   ("notifications.sae_reminder_before_deadline_hours", self.notifications.sae_reminder_before_deadline_hours,
                    "deadline_hours")]
        for name, value, kind in checks:
            high, reason = PROTOCOL_BOUNDS[kind]
            if not 0 <= value <= high:
                raise ValueError(f"{name} is {value}; it must be from 0 to {high} ({reason})")

    @property
    def version(self) -> str:
        return self.protocol.version

    @property
    def timezone(self) -> str:
        return self.site.timezone.value

    def dose_level(self, level: int) -> DoseLevel:
        for lvl in self.dose_levels.levels:
            if lvl.level == level:
                return lvl
        n = len(self.dose_levels.levels)
        raise ProtocolFileError(f"dose level {level} does not exist: the protocol has levels 1 to {n}")


def parse_protocol(data: object, *, origin: str = "protocol file") -> ProtocolDefinition:
    """Validate already-parsed protocol data; errors name the key that is wrong."""
    if not isinstance(data, dict):
        raise ProtocolFileError(f"{origin}: the top level must be a mapping of sections")
    try:
        return ProtocolDefinition.model_validate(data)
    except ValidationError as exc:
        raise ProtocolFileError(first_validation_error(exc, origin)) from None


# PyYAML's safe loader in C (libyaml) when the wheel has it: the same safe subset, ~10× faster than the pure-Python one
# (the protocol file is read by every command and every run).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_protocol(path: Path | str | None = None) -> ProtocolDefinition:
    """Read and validate a protocol YAML file (the shipped NCT06641648 file by default)."""
    p = Path(path) if path is not None else DEFAULT_PROTOCOL_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProtocolFileError(f"protocol file {p.name}: cannot be read ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ProtocolFileError(f"protocol file {p.name}: is not valid YAML{where}") from None
    return parse_protocol(data, origin=f"protocol file {p.name}")
