"""`nktrial ae`: adverse events and DLT adjudication.

The services are imported inside each command: building the parser stays cheap.
"""

from __future__ import annotations

from nktrial.cli.shared import actor, deliver_now, enum_argument, record_id, validated, writer, yes_no


def _categories():
    from protocol.dlt import AeCategory

    return AeCategory


def _attributions():
    from protocol.dlt import Attribution

    return Attribution


def cmd_ae_report(args) -> None:
    from tasks.adverse_events import AeReport, report_adverse_event

    report = validated(AeReport, {
        "subject_id": args.subject, "term": args.term, "category": args.category, "grade": args.grade, "onset_on": args.onset_on,
        "attribution": args.attribution, "serious": args.serious, "resolved_on": args.resolved_on,
        "resolved_to_grade_1_within_72h": yes_no("--resolved-within-72h", args.resolved_within_72h), "duration_days": args.duration_days,
        "caused_by_leukaemia": yes_no("--caused-by-leukaemia", args.caused_by_leukaemia),
        "caused_by_progression": yes_no("--caused-by-progression", args.caused_by_progression)}, "adverse event")
    engine, p, clock = writer(args)
    out = report_adverse_event(engine, p, report=report, actor=actor(args), clock=clock)
    print(f"AE {out.ae_id} recorded for {out.subject_id}; DLT screen: {out.screen.value} ({out.rule})")
    if out.serious:
        print(f"serious: report it within {p.notifications.sae_report_deadline_hours} h, then: nktrial ae sae-reported --ae {out.ae_id}")
    deliver_now(args)


def cmd_ae_update(args) -> None:
    from tasks.adverse_events import AeUpdate, update_adverse_event

    update = validated(AeUpdate, {
        "ae_id": args.ae, "grade": args.grade, "resolved_on": args.resolved_on, "duration_days": args.duration_days,
        "resolved_to_grade_1_within_72h": yes_no("--resolved-within-72h", args.resolved_within_72h),
        "caused_by_leukaemia": yes_no("--caused-by-leukaemia", args.caused_by_leukaemia),
        "caused_by_progression": yes_no("--caused-by-progression", args.caused_by_progression), "reason": args.reason}, "AE update")
    engine, p, clock = writer(args)
    out = update_adverse_event(engine, p, update=update, actor=actor(args), clock=clock)
    print(f"AE {out.ae_id} updated; DLT screen: {out.screen.value} ({out.rule})")
    deliver_now(args)


def cmd_ae_adjudicate(args) -> None:
    from tasks.adverse_events import adjudicate_dlt

    engine, p, clock = writer(args)
    try:
        early = adjudicate_dlt(engine, p, ae_id=args.ae, confirm=args.confirm, reason=args.reason,
                               investigator_id=args.investigator or actor(args), code=args.code, clock=clock)
    finally:
        deliver_now(args)  # a lockout tells the safety desk and the PI
    print(f"AE {args.ae}: DLT {'confirmed' if args.confirm else 'rejected'}")
    if early:
        print("two DLTs at this level: the cohort ends now; run the cohort review (nktrial escalation status shows it)")


def cmd_ae_code(args) -> None:
    """Send a one-time code for (this AE's adjudication, signer) to the signer's own channel. The code is never printed."""
    from tasks.delivery import load_channels
    from tasks.settings import get_settings
    from tasks.signing import SignedAct, send_signing_code

    engine, p, clock = writer(args)
    signer = args.signer or actor(args)
    sent = send_signing_code(engine, p, load_channels(get_settings().apprise_config), act=SignedAct.adjudication(args.ae),
                             signer_id=signer, clock=clock, actor=actor(args, required=False) or signer)
    print(f"one-time signing code for the adjudication of AE {args.ae} {sent.sentence} "
          f"(valid {p.escalation.signing_code_valid_hours.value} h; {signer}'s earlier codes for it stop working)")


def cmd_ae_sae_reported(args) -> None:
    from tasks.adverse_events import record_sae_report

    engine, p, clock = writer(args)
    record_sae_report(engine, p, ae_id=args.ae, actor=actor(args), clock=clock)
    print(f"AE {args.ae}: expedited SAE report recorded")


def add_parsers(sub) -> None:
    ae = sub.add_parser("ae", help="adverse events and DLT adjudication").add_subparsers(dest="action", required=True, metavar="ACTION")
    rep = ae.add_parser("report", help="report an adverse event (screened against the DLT rules)")
    rep.add_argument("--subject", required=True)
    rep.add_argument("--term", required=True, help="CTCAE term")
    enum_argument(rep, "--category", load=_categories, required=True)
    rep.add_argument("--grade", type=int, required=True)
    rep.add_argument("--onset-on", required=True)
    enum_argument(rep, "--attribution", load=_attributions, required=True)
    rep.add_argument("--serious", action="store_true")
    upd = ae.add_parser("update", help="change an AE's grade, resolution or a DLT fact (history is kept)")
    upd.add_argument("--ae", type=record_id, required=True)
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
    adj.add_argument("--ae", type=record_id, required=True)
    which = adj.add_mutually_exclusive_group(required=True)
    which.add_argument("--confirm", dest="confirm", action="store_true")
    which.add_argument("--reject", dest="confirm", action="store_false")
    adj.add_argument("--reason", required=True)
    adj.add_argument("--investigator", help="the adjudicating investigator's staff ID (default: --as or NKTRIAL_ACTOR)")
    adj.add_argument("--code", required=True, help="the one-time code sent to your own channel for this AE (nktrial ae code)")
    adj.set_defaults(func=cmd_ae_adjudicate)
    code = ae.add_parser("code", help="send a one-time code to sign an AE's DLT adjudication to the signer's own channel (never printed)")
    code.add_argument("--ae", type=record_id, required=True)
    code.add_argument("--signer", help="the investigator's or PI's staff ID (default: --as or NKTRIAL_ACTOR)")
    code.set_defaults(func=cmd_ae_code)
    sae = ae.add_parser("sae-reported", help="record that the expedited SAE report was filed")
    sae.add_argument("--ae", type=record_id, required=True)
    sae.set_defaults(func=cmd_ae_sae_reported)
