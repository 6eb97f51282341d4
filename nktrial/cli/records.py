"""Recording what was done, the same operations as the flows, straight to the trial database:
`nktrial enroll`, `record infusion|il2|visit|lab`, `off-study`.

The services are imported inside each command: building the parser stays cheap.
"""

from __future__ import annotations

from nktrial.cli.shared import (
    actor,
    deliver_now,
    enum_argument,
    local_date,
    local_datetime,
    read_screening,
    sync_projection,
    validated,
    writer,
)
from protocol.errors import UserError

VISITS = ["1-month", "3-month"]  # as the staff say it; record_visit and the lab's visit field take the stored names


def _off_study_reasons():
    from models.tables import OffStudyReason

    return OffStudyReason


def _set_by_decisions() -> set:
    return {r for r in _off_study_reasons() if r.set_by_a_signed_decision}


def _lab_kinds():
    from models.tables import LabKind

    return LabKind


def _mrd_statuses():
    from protocol.recording import MrdStatus

    return MrdStatus


def _responses():
    from protocol.recording import Response

    return Response


def cmd_enroll(args) -> None:
    from tasks.enrollment import EnrollmentStatus, enroll

    engine, p, clock = writer(args)
    outcome = enroll(engine, p, record=read_screening(args.file), planned_day0=local_datetime("--day0", args.day0),
                     actor=actor(args), clock=clock)
    print(outcome.message)
    deliver_now(args)
    if outcome.status is EnrollmentStatus.ENROLLED:
        sync_projection(outcome.subject_id)


def cmd_record_infusion(args) -> None:
    from protocol.recording import site_text
    from tasks.recording import record_infusion

    engine, p, clock = writer(args)
    given_at = local_datetime("--given-at", args.given_at)
    record_infusion(engine, p, subject_id=args.subject, infusion_number=args.number, given_at=given_at,
                    dose_level=args.dose_level, cells_infused=args.cells, product_lot=args.lot, deviation_reason=args.deviation_reason,
                    actor=actor(args), clock=clock)
    print(f"{args.subject}: NK infusion {args.number} recorded at {site_text(p, given_at)}; the calendar is re-anchored")
    deliver_now(args)
    sync_projection(args.subject)


def cmd_record_il2(args) -> None:
    from tasks.recording import record_il2_dose

    if (args.given_at is None) == (args.missed is None):
        raise UserError("give exactly one of --given-at (the dose was given) or --missed REASON (it was not)")
    from protocol.recording import site_text

    given_at = local_datetime("--given-at", args.given_at) if args.given_at else None
    engine, p, clock = writer(args)
    record_il2_dose(engine, p, subject_id=args.subject, dose_number=args.dose, given=given_at is not None, given_at=given_at,
                    missed_reason=args.missed, deviation_reason=args.deviation_reason, actor=actor(args), clock=clock)
    print(f"{args.subject}: IL-2 dose {args.dose} recorded as {f'given at {site_text(p, given_at)}' if given_at else 'missed'}")


def cmd_record_visit(args) -> None:
    from protocol.recording import VisitKind
    from tasks.recording import record_visit

    engine, p, clock = writer(args)
    visit = VisitKind.ONE_MONTH if args.visit == "1-month" else VisitKind.THREE_MONTH
    record_visit(engine, p, subject_id=args.subject, visit=visit, done_on=local_date("--done-on", args.done_on),
                 deviation_reason=args.deviation_reason, actor=actor(args), clock=clock)
    print(f"{args.subject}: {args.visit} visit recorded")


def cmd_record_lab(args) -> None:
    from tasks.recording import LabResultInput, record_lab_result

    fields = {"subject_id": args.subject, "kind": args.kind, "sampled_on": args.sampled_on, "pk_day": args.pk_day,
              "donor_nk_cells_per_ul": args.cells_per_ul, "mrd": args.mrd, "mrd_percent": args.mrd_percent, "response": args.response}
    if args.visit:
        fields["visit"] = "visit_1_month" if args.visit == "1-month" else "visit_3_month"
    result = validated(LabResultInput, fields, "lab result")
    engine, p, clock = writer(args)
    record_lab_result(engine, p, result=result, actor=actor(args), clock=clock)
    print(f"{args.subject}: {args.kind} recorded")


def cmd_off_study(args) -> None:
    from models.tables import OffStudyReason
    from tasks.recording import take_off_study

    engine, p, clock = writer(args)
    n = take_off_study(engine, p, subject_id=args.subject, reason=OffStudyReason(args.reason),
                       effective_on=local_date("--effective-on", args.effective_on), actor=actor(args), clock=clock)
    print(f"{args.subject} is off study ({args.reason}); {n} planned events cancelled, the record is kept")
    deliver_now(args)
    sync_projection(args.subject)


def add_enroll_parsers(sub) -> None:
    """enroll, and record infusion|il2|visit|lab."""
    enr = sub.add_parser("enroll", help="screen and enroll a patient from a JSON screening record")
    enr.add_argument("file")
    enr.add_argument("--day0", required=True, help="planned NK infusion 1, site-local, e.g. 2027-01-31T09:00")
    enr.set_defaults(func=cmd_enroll)

    rec = sub.add_parser("record", help="record what was done").add_subparsers(dest="action", required=True, metavar="WHAT")
    inf = rec.add_parser("infusion", help="an NK infusion given")
    inf.add_argument("--subject", required=True)
    inf.add_argument("--number", type=int, required=True, help="1 or 2")
    inf.add_argument("--dose-level", type=int, required=True, help="the subject's assigned level, as a check")
    inf.add_argument("--given-at", required=True, help="site-local (the protocol's timezone), e.g. 2027-01-31T09:10 or '2027-01-31 09:10'")
    inf.add_argument("--cells", type=float, required=True, help="cells infused, e.g. 1e8")
    inf.add_argument("--lot", required=True, help="product lot")
    inf.add_argument("--deviation-reason")
    inf.set_defaults(func=cmd_record_infusion)
    il2 = rec.add_parser("il2", help="an IL-2 dose given (--given-at) or missed (--missed REASON)")
    il2.add_argument("--subject", required=True)
    il2.add_argument("--dose", type=int, required=True, help="dose number, 1 to 28")
    il2.add_argument("--given-at", help="site-local (the protocol's timezone), e.g. 2027-02-01T09:00")
    il2.add_argument("--missed", metavar="REASON")
    il2.add_argument("--deviation-reason")
    il2.set_defaults(func=cmd_record_il2)
    vis = rec.add_parser("visit", help="the 1-month or 3-month visit done")
    vis.add_argument("--subject", required=True)
    vis.add_argument("--visit", choices=VISITS, required=True)
    vis.add_argument("--done-on", required=True)
    vis.add_argument("--deviation-reason")
    vis.set_defaults(func=cmd_record_visit)
    lab = rec.add_parser("lab", help="a donor NK count (PK), MRD by MFC, or response")
    lab.add_argument("--subject", required=True)
    enum_argument(lab, "--kind", load=_lab_kinds, required=True)
    lab.add_argument("--sampled-on", required=True)
    lab.add_argument("--pk-day", type=int)
    lab.add_argument("--cells-per-ul", type=float)
    enum_argument(lab, "--mrd", load=_mrd_statuses)
    lab.add_argument("--mrd-percent", type=float)
    enum_argument(lab, "--response", load=_responses)
    lab.add_argument("--visit", choices=VISITS)
    lab.set_defaults(func=cmd_record_lab)


def add_off_study_parser(sub) -> None:
    off = sub.add_parser("off-study", help="take a patient off study (cancels future runs and notices, keeps the record)")
    off.add_argument("--subject", required=True)
    enum_argument(off, "--reason", load=_off_study_reasons, leave_out=_set_by_decisions, required=True)
    off.add_argument("--effective-on", required=True)
    off.set_defaults(func=cmd_off_study)
