"""`nktrial`: the command line. Bad input gets one sentence and exit status 2, never a traceback.

Heavy imports (database, Prefect) happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from protocol.errors import UserError, first_validation_error

EXIT_USER_ERROR = 2


def _local_datetime(flag: str, text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a local date and time like 2027-01-31T09:00") from None
    if value.tzinfo is not None:
        raise UserError(f"{flag} '{text}' has a UTC offset; give the site's local wall-clock time without one")
    return value


def _local_date(flag: str, text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a date like 2027-01-31") from None


def _protocol(args):
    from protocol.definition import load_protocol

    path = args.protocol
    if path is None:
        from tasks.settings import get_settings

        path = get_settings().protocol_file
    return load_protocol(path)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# -- protocol -------------------------------------------------------------------------------------

def cmd_protocol_show(args) -> None:
    p = _protocol(args)
    if args.json:
        _print_json(p.model_dump(mode="json"))
        return
    tag = lambda s: "[R]" if s == "registry" else "[A]"  # noqa: E731
    print(f"{p.protocol.trial_id} — protocol version {p.version}\n{p.protocol.title}")
    print("Values marked [R] come from the registry record; [A] are site assumptions for the PI to confirm.\n")
    print(f"Site timezone        {p.timezone} {tag(p.site.timezone.source)}")
    print(f"Dose levels          {tag(p.dose_levels.source)}")
    for lvl in p.dose_levels.levels:
        print(f"  DL{lvl.level}  {lvl.cells_per_infusion:.1e} cells per infusion")
    print(f"NK infusions         {tag(p.nk_infusions.source)}")
    for inf in p.nk_infusions.infusions:
        print(f"  infusion {inf.number}: day {inf.day} (window −{inf.window.minus_days}/+{inf.window.plus_days}) {tag(inf.window.source)}")
    lead = p.nk_infusions.product_request_lead_days
    print(f"  product request to the cell lab {lead.value} days before each infusion {tag(lead.source)}; "
          f"route {p.nk_infusions.route.value} {tag(p.nk_infusions.route.source)}")
    il2 = p.il2
    print(f"IL-2                 {il2.dose_miu.value:g} MIU {il2.route.value} once daily for {il2.duration_days.value} days "
          f"{tag(il2.dose_miu.source)}, from day {il2.first_day.value} {tag(il2.first_day.source)}")
    w = p.dlt.window
    print(f"DLT window           day {w.open_day} to end of day {w.close_day} {tag(w.source)}; rules {tag(p.dlt.rules.source)} (CTCAE v{p.dlt.rules.ctcae_version})")
    print("Visits")
    for v in p.visits:
        print(f"  {v.label}: day {v.day} (window −{v.window.minus_days}/+{v.window.plus_days}) {tag(v.source)} — {', '.join(v.procedures)}")
    pk = ", ".join(f"{s.anchor.replace('_', ' ')}+{s.offset_days}" for s in p.pk_samples.samples)
    print(f"PK samples           {pk} {tag(p.pk_samples.source)}")
    c = p.contraception.months_after_last_infusion
    print(f"Contraception        {c.value} months after the last infusion {tag(c.source)}")
    e = p.escalation
    print(f"Escalation           {e.design.value} {tag(e.design.source)}, cohorts of {e.cohort_size.value}, at most {e.max_per_level.value} a level, "
          f"target {e.target_enrollment.value} {tag(e.target_enrollment.source)}, at most {e.max_enrollment.value}")
    print(f"Eligibility          {len(p.eligibility.inclusion)} inclusion, {len(p.eligibility.exclusion)} exclusion criteria, "
          f"{len(p.eligibility.washouts)} washouts {tag(p.eligibility.washout_boundary.source)} boundary: {p.eligibility.washout_boundary.value}")


# -- calendar -------------------------------------------------------------------------------------

def cmd_calendar(args) -> None:
    from protocol.calendar import compute_calendar

    p = _protocol(args)
    day0 = _local_datetime("--day0", args.day0)
    actuals = {}
    for item in args.actual or []:
        num, _, when = item.partition("=")
        if not num.isdigit() or not when:
            raise UserError(f"--actual '{item}' must look like 2=2027-02-16T09:00 (infusion number = local date and time)")
        actuals[int(num)] = _local_datetime("--actual", when)
    cal = compute_calendar(p, dose_level=args.dose_level, day0=day0, actual_infusions=actuals)
    if args.json:
        _print_json([e.as_dict() for e in cal.events])
        return
    print(f"Dose level {cal.dose_level} ({cal.cells_per_infusion:.1e} cells/infusion), day 0 {cal.day0:%Y-%m-%d %H:%M} {cal.timezone}, "
          f"protocol {cal.protocol_version}\n")
    rows = [[str(e.protocol_day), e.local_date.isoformat(), e.local_time.strftime("%H:%M") if e.local_time else "24:00",
             e.label, f"{e.window_start}…{e.window_end}" if e.window_start != e.window_end else "", " ".join(e.flags)]
            for e in cal.events]
    print(_table(rows, ["day", "date", "time", "event", "window", "flags"]))


# -- screening ------------------------------------------------------------------------------------

def _read_screening(path: str):
    from pydantic import ValidationError

    from protocol.eligibility import ScreeningRecord

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"screening file {path}: cannot be read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"screening file {path}: is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    try:
        return ScreeningRecord.model_validate(data)
    except ValidationError as exc:
        raise UserError(first_validation_error(exc, f"screening file {path}")) from None


def cmd_screen(args) -> None:
    from protocol.eligibility import screen

    p = _protocol(args)
    rec = _read_screening(args.file)
    day0_on = _local_date("--day0", args.day0) if args.day0 else None
    res = screen(p, rec, day0_on=day0_on)
    if args.json:
        _print_json(res.model_dump(mode="json"))
        return
    mark = {True: "ok", False: "FAIL", None: "?"}
    rows = [[mark[c.allows_enrollment], c.id, c.status.value, c.value, c.limit] for c in res.criteria]
    print(f"Screening {res.subject_id} (protocol {res.protocol_version})\n")
    print(_table(rows, ["", "criterion", "status", "value", "limit"]))
    earliest = res.earliest_day0_on
    bound = " (at least: some washout data are missing)" if res.earliest_day0_is_lower_bound else ""
    print(f"\nEarliest permissible day 0: {earliest or 'unknown'}{bound}")
    print(f"Verdict: {res.verdict.value.replace('_', ' ').upper()}")
    for c in res.failing:
        print(f"  fails {c.id}: {c.reason}")
    for c in res.unknown:
        print(f"  unknown {c.id}: {c.reason}")


# -- escalation -----------------------------------------------------------------------------------

def cmd_escalation_next(args) -> None:
    from protocol.three_plus_three import Design

    p = _protocol(args)
    design = Design(num_levels=len(p.dose_levels.levels), cohort_size=p.escalation.cohort_size.value)
    decision = design.next_action(args.history)
    if args.json:
        _print_json(decision.as_dict())
        return
    where = f" {decision.patients} at level {decision.dose_level}" if decision.dose_level else ""
    mtd = f"; MTD: level {decision.mtd}" if decision.mtd else ("; no tolerable dose" if decision.action.value == "stop" else "")
    print(f"{decision.action.value}{where}{mtd}\n{decision.reason}")


def _design(args):
    from protocol.three_plus_three import Design

    p = _protocol(args)
    return Design(num_levels=len(p.dose_levels.levels), cohort_size=p.escalation.cohort_size.value)


def _probabilities(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--p '{text}' must be DLT probabilities separated by commas, e.g. 0.05,0.15,0.30") from None


def cmd_escalation_oc(args) -> None:
    from protocol.operating import operating_characteristics

    try:
        oc = operating_characteristics(_design(args), _probabilities(args.p))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        _print_json(oc.as_dict())
        return
    rows = [[f"DL{k}", f"{oc.p[k - 1]:.2f}", f"{oc.p_mtd[k]:.4f}", f"{oc.expected_patients[k]:.2f}", f"{oc.expected_dlts[k]:.2f}"]
            for k in oc.p_mtd]
    print(f"3+3, exact over {oc.paths} dose paths\n")
    print(_table(rows, ["level", "true P(DLT)", "P(declared MTD)", "E[patients]", "E[DLTs]"]))
    print(f"\nP(no tolerable dose) = {oc.p_no_tolerable_dose:.4f}; E[patients] in all = {sum(oc.expected_patients.values()):.2f}")


def cmd_escalation_paths(args) -> None:
    from protocol.operating import dose_paths

    design = _design(args)
    p = _probabilities(args.p) if args.p else None
    if p is not None and len(p) != design.num_levels:
        raise UserError(f"--p needs one DLT probability per dose level ({design.num_levels}), got {len(p)}")
    paths = dose_paths(design)
    rows = [{"history": x.history, "mtd": x.final.mtd, "patients": sum(c.n for c in x.cohorts),
             **({"probability": x.probability(p)} if p else {})} for x in paths]
    if p:
        rows.sort(key=lambda r: -r["probability"])
    if args.json:
        _print_json(rows)
        return
    header = ["history", "MTD", "patients"] + (["probability"] if p else [])
    print(_table([[r["history"], str(r["mtd"] or "none"), str(r["patients"])] + ([f"{r['probability']:.6f}"] if p else [])
                  for r in rows[: args.limit]], header))
    print(f"\n{len(paths)} paths" + (f"; the {args.limit} shown" if args.limit < len(paths) else ""))


# -- database -------------------------------------------------------------------------------------

def _engine():
    import sqlalchemy as sa

    from models.db import make_engine
    from tasks.settings import get_settings

    url = get_settings().trial_database_url
    try:
        engine = make_engine(url)
        with engine.connect():
            pass
    except sa.exc.ArgumentError:
        raise UserError(f"NKTRIAL_DATABASE_URL '{url}' is not a database URL like postgresql+psycopg://user@host/db") from None
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "no connection"
        raise UserError(f"trial database {sa.engine.make_url(url).render_as_string(hide_password=True)} is not reachable ({reason})") from None
    return engine


def cmd_db_upgrade(args) -> None:
    from models.crud import register_protocol
    from models.db import UnitOfWork
    from models.migrate import current_revision, upgrade

    engine = _engine()
    before = current_revision(engine)
    upgrade(engine)
    after = current_revision(engine)
    with UnitOfWork(engine, actor="system", reason="register the protocol version in force") as uow:
        register_protocol(uow.session, protocol=_protocol(args), at=uow.at)
        uow.commit()
    state = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    print(f"trial database {engine.url.render_as_string(hide_password=True)}: {state} schema {after}")


def cmd_db_status(args) -> None:
    from sqlmodel import Session, func, select

    from models.migrate import current_revision, head_revision
    from models.tables import AuditLog, DoseLevelState, Subject

    engine = _engine()
    rev, head = current_revision(engine), head_revision()
    print(f"trial database {engine.url.render_as_string(hide_password=True)}")
    print(f"schema {rev or 'empty'} (newest {head}){'' if rev == head else ' — run: nktrial db upgrade'}")
    if rev != head:
        return
    with Session(engine) as s:
        levels = s.exec(select(DoseLevelState).order_by(DoseLevelState.level)).all()
        print("dose levels: " + (", ".join(f"DL{lv.level} {lv.status.value}" for lv in levels) or "none"))
        print(f"subjects: {s.exec(select(func.count()).select_from(Subject)).one()}, "
              f"audit rows: {s.exec(select(func.count()).select_from(AuditLog)).one()}")


# -- recording (the same operations as the flows, straight to the trial database) ---------------

def _writer(args):
    from models.clock import wall_clock
    from tasks.runtime import protocol

    return _engine(), protocol() if args.protocol is None else _protocol(args), wall_clock


def _deliver_now(args) -> None:
    """Send what the write put in the outbox; a channel that is down keeps it pending, not lost."""
    from tasks.settings import get_settings
    from tasks.delivery import deliver_pending, load_channels

    engine, _, clock = _writer(args)
    report = deliver_pending(engine, load_channels(get_settings().apprise_config), clock=clock)
    if report.pending:
        print(f"note: {report.pending} notice(s) wait in the outbox for a channel that did not answer; `nktrial notify deliver` retries")


def _sync_projection(subject_id: str) -> None:
    """Ask the Prefect server, if one is configured, to re-project the patient's runs."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        print("note: PREFECT_API_URL is not set; the patient's scheduled runs catch up at the next daily rounds")
        return
    from prefect.deployments import run_deployment

    run = run_deployment("patient-treatment/patient-treatment", parameters={"subject": {"subject_id": subject_id}},
                         timeout=0, as_subflow=False, flow_run_name=f"{subject_id} · treatment plan")
    print(f"patient-treatment run {run.id} re-projects {subject_id}'s scheduled runs")


def cmd_enroll(args) -> None:
    from tasks.records import EnrollmentStatus, enroll

    engine, p, clock = _writer(args)
    outcome = enroll(engine, p, record=_read_screening(args.file), planned_day0=_local_datetime("--day0", args.day0),
                     actor=args.actor, clock=clock)
    print(outcome.message)
    _deliver_now(args)
    if outcome.status is EnrollmentStatus.ENROLLED:
        _sync_projection(outcome.subject_id)


def cmd_record_infusion(args) -> None:
    from tasks.records import record_infusion

    engine, p, clock = _writer(args)
    record_infusion(engine, p, subject_id=args.subject, infusion_number=args.number, given_at=_local_datetime("--given-at", args.given_at),
                    dose_level=args.dose_level, cells_infused=args.cells, product_lot=args.lot, deviation_reason=args.deviation_reason,
                    actor=args.actor, clock=clock)
    print(f"{args.subject}: NK infusion {args.number} recorded; calendar re-anchored")
    _deliver_now(args)
    _sync_projection(args.subject)


def cmd_record_il2(args) -> None:
    from tasks.records import record_il2_dose

    if (args.given_at is None) == (args.missed is None):
        raise UserError("give exactly one of --given-at (the dose was given) or --missed REASON (it was not)")
    engine, p, clock = _writer(args)
    record_il2_dose(engine, p, subject_id=args.subject, dose_number=args.dose, given=args.given_at is not None,
                    given_at=_local_datetime("--given-at", args.given_at) if args.given_at else None, missed_reason=args.missed,
                    deviation_reason=args.deviation_reason, actor=args.actor, clock=clock)
    print(f"{args.subject}: IL-2 dose {args.dose} recorded as {'given' if args.given_at else 'missed'}")


def cmd_record_visit(args) -> None:
    from tasks.records import VisitKind, record_visit

    engine, p, clock = _writer(args)
    visit = VisitKind.ONE_MONTH if args.visit == "1-month" else VisitKind.THREE_MONTH
    record_visit(engine, p, subject_id=args.subject, visit=visit, done_on=_local_date("--done-on", args.done_on),
                 deviation_reason=args.deviation_reason, actor=args.actor, clock=clock)
    print(f"{args.subject}: {args.visit} visit recorded")


def cmd_record_lab(args) -> None:
    from pydantic import ValidationError

    from tasks.records import LabResultInput, record_lab_result

    fields = {"subject_id": args.subject, "kind": args.kind, "sampled_on": args.sampled_on, "pk_day": args.pk_day,
              "donor_nk_cells_per_ul": args.cells_per_ul, "mrd": args.mrd, "mrd_percent": args.mrd_percent, "response": args.response}
    if args.visit:
        fields["visit"] = "visit_1_month" if args.visit == "1-month" else "visit_3_month"
    try:
        result = LabResultInput.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise UserError(first_validation_error(exc, "lab result")) from None
    engine, p, clock = _writer(args)
    record_lab_result(engine, p, result=result, actor=args.actor, clock=clock)
    print(f"{args.subject}: {args.kind} recorded")


def cmd_off_study(args) -> None:
    from models.tables import OffStudyReason
    from tasks.records import take_off_study

    engine, p, clock = _writer(args)
    n = take_off_study(engine, p, subject_id=args.subject, reason=OffStudyReason(args.reason),
                       effective_on=_local_date("--effective-on", args.effective_on), actor=args.actor, clock=clock)
    print(f"{args.subject} is off study ({args.reason}); {n} planned events cancelled, the record is kept")
    _deliver_now(args)
    _sync_projection(args.subject)


def cmd_notify_deliver(args) -> None:
    from tasks.settings import get_settings
    from tasks.delivery import deliver_pending, load_channels

    engine, _, clock = _writer(args)
    report = deliver_pending(engine, load_channels(get_settings().apprise_config), clock=clock)
    print(f"{report.delivered} delivered, {report.no_channel} with no channel configured, {report.pending} still waiting for a channel")


def cmd_notify_list(args) -> None:
    from sqlmodel import Session, select

    from models.tables import NotificationOutbox

    engine = _engine()
    with Session(engine) as s:
        rows = s.exec(select(NotificationOutbox).order_by(NotificationOutbox.id.desc()).limit(args.limit)).all()
    print(_table([[str(r.id), f"{r.created_at:%Y-%m-%d %H:%M}", r.role, r.status.value, r.body[:90]] for r in rows],
                 ["id", "created (UTC)", "role", "status", "message"]))


# -- safety and escalation ----------------------------------------------------------------------

def _yes_no(flag: str, text: str | None) -> bool | None:
    if text is None:
        return None
    if text.lower() in ("yes", "y", "true"):
        return True
    if text.lower() in ("no", "n", "false"):
        return False
    raise UserError(f"{flag} '{text}' must be yes or no")


def _model(cls, data: dict, what: str):
    from pydantic import ValidationError

    try:
        return cls.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        raise UserError(first_validation_error(exc, what)) from None


def cmd_ae_report(args) -> None:
    from tasks.safety import AeReport, report_adverse_event

    report = _model(AeReport, {
        "subject_id": args.subject, "term": args.term, "category": args.category, "grade": args.grade, "onset_on": args.onset_on,
        "attribution": args.attribution, "serious": args.serious, "resolved_on": args.resolved_on,
        "resolved_to_grade_1_within_72h": _yes_no("--resolved-within-72h", args.resolved_within_72h), "duration_days": args.duration_days,
        "caused_by_leukaemia": _yes_no("--caused-by-leukaemia", args.caused_by_leukaemia),
        "caused_by_progression": _yes_no("--caused-by-progression", args.caused_by_progression)}, "adverse event")
    engine, p, clock = _writer(args)
    out = report_adverse_event(engine, p, report=report, actor=args.actor, clock=clock)
    print(f"AE {out.ae_id} recorded for {out.subject_id}; DLT screen: {out.screen.value} ({out.rule})")
    if out.serious:
        print(f"serious: report it within {p.notifications.sae_report_deadline_hours} h, then: nktrial ae sae-reported --ae {out.ae_id}")
    _deliver_now(args)


def cmd_ae_update(args) -> None:
    from tasks.safety import AeUpdate, update_adverse_event

    update = _model(AeUpdate, {
        "ae_id": args.ae, "grade": args.grade, "resolved_on": args.resolved_on, "duration_days": args.duration_days,
        "resolved_to_grade_1_within_72h": _yes_no("--resolved-within-72h", args.resolved_within_72h),
        "caused_by_leukaemia": _yes_no("--caused-by-leukaemia", args.caused_by_leukaemia),
        "caused_by_progression": _yes_no("--caused-by-progression", args.caused_by_progression), "reason": args.reason}, "AE update")
    engine, p, clock = _writer(args)
    out = update_adverse_event(engine, p, update=update, actor=args.actor, clock=clock)
    print(f"AE {out.ae_id} updated; DLT screen: {out.screen.value} ({out.rule})")
    _deliver_now(args)


def cmd_ae_adjudicate(args) -> None:
    from tasks.safety import adjudicate_dlt

    engine, p, clock = _writer(args)
    early = adjudicate_dlt(engine, p, ae_id=args.ae, confirm=args.confirm, reason=args.reason, investigator_id=args.investigator, clock=clock)
    print(f"AE {args.ae}: DLT {'confirmed' if args.confirm else 'rejected'}")
    if early:
        print("two DLTs at this level: the cohort ends now; run the cohort review (nktrial escalation status shows it)")


def cmd_ae_sae_reported(args) -> None:
    from tasks.safety import record_sae_report

    engine, _, clock = _writer(args)
    record_sae_report(engine, ae_id=args.ae, actor=args.actor, clock=clock)
    print(f"AE {args.ae}: expedited SAE report recorded")


def cmd_escalation_status(args) -> None:
    from sqlmodel import Session

    from tasks.safety import cohort_status_table, trial_state, waiting_reviews

    engine, p, _ = _writer(args)
    with Session(engine) as s:
        state = trial_state(s, p)
        waiting = waiting_reviews(s)
    print(f"history: {state.history or '(none yet)'}")
    rows = cohort_status_table(state)
    if rows:
        print(_table([[str(r[k]) for k in r] for r in rows], list(rows[0])))
    if state.ready and state.recommendation:
        print(f"\nready for review: 3+3 recommends {state.recommendation.action.value}"
              + (f" at DL{state.recommendation.dose_level}" if state.recommendation.dose_level else "")
              + (" (early stop)" if state.early_stop else ""))
    elif state.pending:
        print(f"\nwaiting for DLT windows: {', '.join(state.pending)}")
    for d in waiting:
        print(f"decision {d.id} waits for the PI's signature: {d.recommended_action} (history {d.history})")


def cmd_escalation_code(args) -> None:
    from tasks.safety import issue_signing_code, open_review

    engine, p, clock = _writer(args)
    d = open_review(engine, p, clock=clock)
    if d is None or d.id != args.decision:
        raise UserError(f"decision {args.decision} is not the review waiting now; see nktrial escalation status")
    code = issue_signing_code(engine, p, decision_id=args.decision, clock=clock)
    print(f"one-time signing code for decision {args.decision}: {code} (valid {p.escalation.signing_code_valid_hours.value} h; "
          "earlier codes stop working)")


def cmd_escalation_approve(args) -> None:
    import uuid

    from protocol.three_plus_three import Action
    from tasks.safety import sign_decision

    engine, p, clock = _writer(args)
    out = sign_decision(engine, p, decision_id=args.decision, signer_id=args.signer, printed_name=args.name, action=Action(args.action),
                        rationale=args.rationale, code=args.code, meaning=args.meaning, attempt_key=f"cli-{uuid.uuid4().hex[:12]}",
                        clock=clock)
    if not out.accepted:
        raise UserError(f"signature refused: {out.reason}")
    print(f"decision {args.decision} {out.reason}")
    _deliver_now(args)


# -- reports --------------------------------------------------------------------------------------

def cmd_report(args) -> None:
    import dataclasses

    from sqlmodel import Session

    from models.clock import now
    from tasks.settings import get_settings
    from tasks import reports

    p = _protocol(args)
    engine = _engine()
    folder = Path(args.out) if args.out else get_settings().data_dir / "reports"
    with Session(engine) as s:
        if args.what == "swimmer":
            from tasks.swimmer import swimmer_png

            target = folder if folder.suffix == ".png" else folder / "swimmer.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(swimmer_png(s, p, reports.today_local(p, now())))
            print(target)
            return
        if args.what == "all":
            rs = reports.write_all(s, p, folder, now=now())
            print(f"{len(rs.files)} files in {folder}:")
            print("\n".join(f"  {f}" for f in rs.files))
            return
        report = {"dashboard": lambda: reports.dashboard(s, p), "pk": lambda: reports.pk(s), "outcomes": lambda: reports.outcomes(s, p)}[args.what]()
    if args.json:
        _print_json(dataclasses.asdict(report))
    else:
        print(report.markdown())


# -- rehearsal ------------------------------------------------------------------------------------

def _rehearsal_text(res) -> str:
    yes = {True: "yes", False: "no (replaced)", None: "—"}
    out = [f"Rehearsal {res.scenario}: {res.title}",
           f"{res.virtual_days} virtual days · {res.runs_executed} runs executed · {res.staff_entries} bedside entries · "
           f"{res.notices_sent} notices · {res.wall_seconds} s", "",
           _table([[p["subject_id"], p["dose_level"] or "—", p["cohort"] or "—", p["status"].replace("_", " "), yes[p["evaluable"]],
                    p["dlts"], p["outcome"]] for p in res.patients],
                  ["patient", "level", "cohort", "status", "evaluable", "DLTs", "DLT window"]), "",
           _table([[f"DL{lv['dose_level']}", lv["status"].replace("_", " "), lv["patients"], lv["dlts"]] for lv in res.levels],
                  ["level", "status", "evaluable", "DLTs"]), "", "decisions:"]
    for i, d in enumerate(res.decisions, start=1):
        target = f" DL{d['level']}" if d["level"] else ""
        signed = f"signed {d['signed']}{target} by {d['signer']} at {d['signed_at']}" if d["signed"] else "waiting for the PI"
        out.append(f"  {i}. {d['history']} → rule: {d['recommended']}"
                   + (f" DL{d['recommended_level']}" if d["recommended_level"] else "") + f"; {signed}")
    if not res.decisions:
        out.append("  none")
    out += ["", f"history: {res.history or '(none)'}",
            f"MTD: {'DL' + str(res.mtd) if res.mtd else 'none declared' + (' (the trial is still open)' if res.trial_open else '')}",
            "3+3 check: " + ("the final state is what the rules imply" if not res.problems else "; ".join(res.problems)),
            f"event log: {res.event_log}", f"reports: {res.reports}"]
    return "\n".join(out)


def cmd_simulate(args) -> None:
    import os
    import time

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the progress lines, not every run's log (read when Prefect loads)

    from nktrial.scenario import load
    from nktrial.server import healthy
    from tasks.settings import get_settings
    from nktrial.simulate import rehearse

    scenario = load(args.scenario)
    protocol = _protocol(args)
    if args.api_url:
        api = args.api_url.rstrip("/")
        if not api.startswith(("http://", "https://")) or not api.endswith("/api"):
            raise UserError(f"--api-url '{args.api_url}' is not a Prefect API address like http://127.0.0.1:4200/api")
        if not healthy(api):
            raise UserError(f"--api-url {api}: no Prefect server answers there; start one (make up) or leave --api-url out")
        if scenario.start <= dt.date.today():
            raise UserError(f"scenario start {scenario.start} is not in the future: on a shared server a worker would take the "
                            "rehearsal's due runs; rehearse there with a later start, or leave --api-url out")
    out = args.out or get_settings().data_dir / "rehearsals" / f"{scenario.name}-{dt.datetime.now():%Y%m%dT%H%M%S}"
    started = time.monotonic()

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    if args.reports_every < 1:
        raise UserError(f"--reports-every {args.reports_every}: give a number of days, 1 or more")
    res = rehearse(scenario, out_dir=Path(out), protocol=protocol, api_url=args.api_url, temporary_server=not args.api_url,
                   progress=progress, reports_every=args.reports_every)
    progress(f"done in {time.monotonic() - started:.0f} s" + ("" if args.api_url else " (the temporary server's start included)"))
    if args.json:
        _print_json(res.as_dict())
    else:
        print(_rehearsal_text(res))
    if res.problems:
        raise SystemExit(1)


# -- the main job ---------------------------------------------------------------------------------

def cmd_up(args) -> None:
    from tasks.settings import get_settings
    from nktrial.up import run

    settings = get_settings()
    code = run(host=args.host, port=args.port, data_dir=settings.data_dir, apprise_config=settings.apprise_config)
    if code:
        raise SystemExit(code)


# -- wiring ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nktrial", description="NCT06641648 treatment schedule: protocol, calendar, screening, escalation.")
    parser.add_argument("--protocol", type=Path, default=None, help="protocol YAML file (default: the shipped NCT06641648 file)")
    parser.add_argument("--actor", default=None, help="who records, for the audit trail (default: NKTRIAL_ACTOR or 'coordinator')")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prot = sub.add_parser("protocol", help="the encoded protocol").add_subparsers(dest="action", required=True, metavar="ACTION")
    show = prot.add_parser("show", help="print the protocol with the source of every value")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_protocol_show)

    cal = sub.add_parser("calendar", help="a patient's whole treatment calendar")
    cal.add_argument("--dose-level", type=int, required=True, help="1, 2 or 3")
    cal.add_argument("--day0", required=True, help="local date and time of infusion 1, e.g. 2027-01-31T09:00")
    cal.add_argument("--actual", action="append", metavar="N=DATETIME", help="recorded infusion N, e.g. 2=2027-02-16T09:00 (repeatable)")
    cal.add_argument("--json", action="store_true")
    cal.set_defaults(func=cmd_calendar)

    scr = sub.add_parser("screen", help="screen a candidate from a JSON screening record")
    scr.add_argument("file")
    scr.add_argument("--day0", help="planned date of infusion 1, e.g. 2027-01-31")
    scr.add_argument("--json", action="store_true")
    scr.set_defaults(func=cmd_screen)

    esc = sub.add_parser("escalation", help="the 3+3 dose-escalation rule").add_subparsers(dest="action", required=True, metavar="ACTION")
    nxt = esc.add_parser("next", help='the next action for an outcome history such as "1NNN 2NTN"')
    nxt.add_argument("history")
    nxt.add_argument("--json", action="store_true")
    nxt.set_defaults(func=cmd_escalation_next)

    oc = esc.add_parser("oc", help="exact operating characteristics for true DLT probabilities")
    oc.add_argument("--p", required=True, help="one DLT probability per level, e.g. 0.05,0.15,0.30")
    oc.add_argument("--json", action="store_true")
    oc.set_defaults(func=cmd_escalation_oc)
    paths = esc.add_parser("paths", help="every dose path the design can take")
    paths.add_argument("--p", help="with probabilities: sorted, most likely first")
    paths.add_argument("--limit", type=int, default=10_000)
    paths.add_argument("--json", action="store_true")
    paths.set_defaults(func=cmd_escalation_paths)

    st = esc.add_parser("status", help="the trial's outcome history, each patient's DLT status, reviews waiting")
    st.set_defaults(func=cmd_escalation_status)
    code = esc.add_parser("code", help="issue a one-time signing code for the review waiting now (at the site terminal)")
    code.add_argument("--decision", type=int, required=True)
    code.set_defaults(func=cmd_escalation_code)
    ap = esc.add_parser("approve", help="sign the waiting decision with a one-time code")
    ap.add_argument("--decision", type=int, required=True)
    ap.add_argument("--signer", required=True, help="signer ID")
    ap.add_argument("--name", required=True, help="printed name")
    ap.add_argument("--action", required=True, choices=["escalate", "expand", "deescalate", "stop"])
    ap.add_argument("--code", required=True)
    ap.add_argument("--meaning", default="Approval: I reviewed this cohort's DLT data and approve this dose-escalation decision")
    ap.add_argument("--rationale")
    ap.set_defaults(func=cmd_escalation_approve)

    ae = sub.add_parser("ae", help="adverse events and DLT adjudication").add_subparsers(dest="action", required=True, metavar="ACTION")
    rep = ae.add_parser("report", help="report an adverse event (screened against the DLT rules)")
    rep.add_argument("--subject", required=True)
    rep.add_argument("--term", required=True, help="CTCAE term")
    rep.add_argument("--category", required=True, choices=["non_haematological", "neutropenia", "thrombocytopenia", "other_haematological",
                                                           "acute_gvhd", "crs", "icans", "infusion_reaction", "fever"])
    rep.add_argument("--grade", type=int, required=True)
    rep.add_argument("--onset-on", required=True)
    rep.add_argument("--attribution", required=True, choices=["unrelated", "unlikely", "possible", "probable", "definite"])
    rep.add_argument("--serious", action="store_true")
    upd = ae.add_parser("update", help="change an AE's grade, resolution or a DLT fact (history is kept)")
    upd.add_argument("--ae", type=int, required=True)
    upd.add_argument("--grade", type=int)
    upd.add_argument("--reason", required=True)
    for parser_ in (rep, upd):
        parser_.add_argument("--resolved-on")
        parser_.add_argument("--resolved-within-72h", metavar="yes|no", help="infusion reaction back to grade ≤ 1 within 72 h")
        parser_.add_argument("--duration-days", type=int, help="cytopenia: days it lasted")
        parser_.add_argument("--caused-by-leukaemia", metavar="yes|no")
        parser_.add_argument("--caused-by-progression", metavar="yes|no")
    rep.set_defaults(func=cmd_ae_report)
    upd.set_defaults(func=cmd_ae_update)
    adj = ae.add_parser("adjudicate", help="confirm or reject a candidate DLT")
    adj.add_argument("--ae", type=int, required=True)
    which = adj.add_mutually_exclusive_group(required=True)
    which.add_argument("--confirm", dest="confirm", action="store_true")
    which.add_argument("--reject", dest="confirm", action="store_false")
    adj.add_argument("--reason", required=True)
    adj.add_argument("--investigator", required=True, help="investigator ID")
    adj.set_defaults(func=cmd_ae_adjudicate)
    sae = ae.add_parser("sae-reported", help="record that the expedited SAE report was filed")
    sae.add_argument("--ae", type=int, required=True)
    sae.set_defaults(func=cmd_ae_sae_reported)

    db = sub.add_parser("db", help="the trial database").add_subparsers(dest="action", required=True, metavar="ACTION")
    db.add_parser("upgrade", help="create or migrate the schema (idempotent) and register the protocol").set_defaults(func=cmd_db_upgrade)
    db.add_parser("status", help="schema revision and a few counts").set_defaults(func=cmd_db_status)
    enr = sub.add_parser("enroll", help="screen and enroll a patient from a JSON screening record")
    enr.add_argument("file")
    enr.add_argument("--day0", required=True, help="planned NK infusion 1, site-local, e.g. 2027-01-31T09:00")
    enr.set_defaults(func=cmd_enroll)

    rec = sub.add_parser("record", help="record what was done").add_subparsers(dest="action", required=True, metavar="WHAT")
    inf = rec.add_parser("infusion", help="an NK infusion given")
    inf.add_argument("--subject", required=True)
    inf.add_argument("--number", type=int, required=True, help="1 or 2")
    inf.add_argument("--dose-level", type=int, required=True, help="the subject's assigned level, as a check")
    inf.add_argument("--given-at", required=True, help="site-local, e.g. 2027-01-31T09:10")
    inf.add_argument("--cells", type=float, required=True, help="cells infused, e.g. 1e8")
    inf.add_argument("--lot", required=True, help="product lot")
    inf.add_argument("--deviation-reason")
    inf.set_defaults(func=cmd_record_infusion)
    il2 = rec.add_parser("il2", help="an IL-2 dose given (--given-at) or missed (--missed REASON)")
    il2.add_argument("--subject", required=True)
    il2.add_argument("--dose", type=int, required=True, help="dose number, 1 to 28")
    il2.add_argument("--given-at")
    il2.add_argument("--missed", metavar="REASON")
    il2.add_argument("--deviation-reason")
    il2.set_defaults(func=cmd_record_il2)
    vis = rec.add_parser("visit", help="the 1-month or 3-month visit done")
    vis.add_argument("--subject", required=True)
    vis.add_argument("--visit", choices=["1-month", "3-month"], required=True)
    vis.add_argument("--done-on", required=True)
    vis.add_argument("--deviation-reason")
    vis.set_defaults(func=cmd_record_visit)
    lab = rec.add_parser("lab", help="a donor NK count (PK), MRD by MFC, or response")
    lab.add_argument("--subject", required=True)
    lab.add_argument("--kind", choices=["donor_nk_count", "mrd_mfc", "response"], required=True)
    lab.add_argument("--sampled-on", required=True)
    lab.add_argument("--pk-day", type=int)
    lab.add_argument("--cells-per-ul", type=float)
    lab.add_argument("--mrd", choices=["positive", "negative"])
    lab.add_argument("--mrd-percent", type=float)
    lab.add_argument("--response", choices=["CR", "CRi", "MLFS", "PR", "SD", "PD"])
    lab.add_argument("--visit", choices=["1-month", "3-month"])
    lab.set_defaults(func=cmd_record_lab)

    off = sub.add_parser("off-study", help="take a patient off study (cancels future runs and notices, keeps the record)")
    off.add_argument("--subject", required=True)
    off.add_argument("--reason", required=True, choices=["withdrawal", "death", "progression", "lost_to_follow_up", "investigator_decision"])
    off.add_argument("--effective-on", required=True)
    off.set_defaults(func=cmd_off_study)

    note = sub.add_parser("notify", help="the notification outbox").add_subparsers(dest="action", required=True, metavar="ACTION")
    note.add_parser("deliver", help="deliver pending notices now (also after a restart)").set_defaults(func=cmd_notify_deliver)
    nl = note.add_parser("list", help="the newest notices and their status")
    nl.add_argument("--limit", type=int, default=20)
    nl.set_defaults(func=cmd_notify_list)

    rpt = sub.add_parser("report", help="reports from the trial database: dashboard, pk, outcomes, swimmer plot, or all with the exports")
    rpt.add_argument("what", choices=["dashboard", "pk", "outcomes", "swimmer", "all"])
    rpt.add_argument("--json", action="store_true", help="dashboard, pk, outcomes: JSON instead of markdown")
    rpt.add_argument("--out", default=None, help="swimmer: a .png file or folder; all: a folder (default: data/reports)")
    rpt.set_defaults(func=cmd_report)

    sim = sub.add_parser("simulate", help="rehearse a whole trial in virtual time through the real deployments")
    sim.add_argument("scenario", help="a scenario YAML file, or a shipped one: no-dlt, one-of-three-expansion, two-dlts-deescalation, "
                                      "late-infusion, withdrawal-replacement, missed-il2")
    sim.add_argument("--json", action="store_true", help="print the final state as JSON")
    sim.add_argument("--api-url", default=None, help="a running Prefect server (default: a temporary one, started and stopped here)")
    sim.add_argument("--out", type=Path, default=None, help="folder for the rehearsal's trial database and event log "
                                                           "(default: data/rehearsals/NAME-TIME)")
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    sim.add_argument("--reports-every", type=int, default=7, metavar="DAYS",
                     help="daily rounds refresh the reports every DAYS virtual days, and once at the end (default 7)")
    sim.set_defaults(func=cmd_simulate)

    up = sub.add_parser("up", help="start a local Prefect server, deploy every flow, start a worker (Ctrl-C stops)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=4200)
    up.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.actor is None:
        from tasks.settings import get_settings

        args.actor = get_settings().actor
    try:
        args.func(args)
    except UserError as exc:
        print(f"nktrial: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as exc:  # a refused write from the data layer, worded for a person
        print(f"nktrial: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
