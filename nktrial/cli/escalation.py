"""`nktrial escalation status|code|approve`: the trial's 3+3 state from the database, and the PI's signature.

(The pure `escalation next|oc|paths` are in nktrial.cli.pure.) The services are imported
inside each command: building the parser stays cheap.
"""

from __future__ import annotations

from nktrial.cli.shared import deliver_now, enum_argument, table, writer
from protocol.errors import UserError

APPROVAL_MEANING = "Approval: I reviewed this cohort's DLT data and approve this dose-escalation decision"


def _actions():
    from protocol.three_plus_three import Action

    return Action


def _not_signable() -> set:
    from protocol.three_plus_three import Action

    return {Action.ENROLL}  # the rule's own first step; a review never ends in it


def cmd_escalation_status(args) -> None:
    from sqlmodel import Session

    from tasks.escalation_gate import trial_state, waiting_reviews
    from tasks.reports import cohort_status_table

    engine, p, _ = writer(args)
    with Session(engine) as s:
        state = trial_state(s, p)
        waiting = waiting_reviews(s)
    print(f"history: {state.history or '(none yet)'}")
    rows = cohort_status_table(state)
    if rows:
        print(table([[str(r[k]) for k in r] for r in rows], list(rows[0])))
    if state.ready and state.recommendation:
        print(f"\nready for review: 3+3 recommends {state.recommendation.action.value}"
              + (f" at DL{state.recommendation.dose_level}" if state.recommendation.dose_level else "")
              + (" (early stop)" if state.early_stop else ""))
    elif state.pending:
        print(f"\nwaiting for DLT windows: {', '.join(state.pending)}")
    for d in waiting:
        print(f"decision {d.id} waits for the PI's signature: {d.recommended_action} (history {d.history})")


def cmd_escalation_code(args) -> None:
    from tasks.escalation_gate import open_review
    from tasks.signatures import issue_signing_code

    engine, p, clock = writer(args)
    d = open_review(engine, p, clock=clock)
    if d is None or d.id != args.decision:
        raise UserError(f"decision {args.decision} is not the review waiting now; see nktrial escalation status")
    code = issue_signing_code(engine, p, decision_id=args.decision, clock=clock)
    print(f"one-time signing code for decision {args.decision}: {code} (valid {p.escalation.signing_code_valid_hours.value} h; "
          "earlier codes stop working)")


def cmd_escalation_approve(args) -> None:
    import uuid

    from protocol.three_plus_three import Action
    from tasks.signatures import sign_decision

    engine, p, clock = writer(args)
    out = sign_decision(engine, p, decision_id=args.decision, signer_id=args.signer, printed_name=args.name, action=Action(args.action),
                        rationale=args.rationale, code=args.code, meaning=args.meaning, attempt_key=f"cli-{uuid.uuid4().hex[:12]}",
                        clock=clock)
    if not out.accepted:
        raise UserError(f"signature refused: {out.reason}")
    print(f"decision {args.decision} {out.reason}")
    deliver_now(args)


def add_parsers(esc) -> None:
    """escalation status, code, approve (after next, oc, paths)."""
    st = esc.add_parser("status", help="the trial's outcome history, each patient's DLT status, reviews waiting")
    st.set_defaults(func=cmd_escalation_status)
    code = esc.add_parser("code", help="issue a one-time signing code for the review waiting now (at the site terminal)")
    code.add_argument("--decision", type=int, required=True)
    code.set_defaults(func=cmd_escalation_code)
    ap = esc.add_parser("approve", help="sign the waiting decision with a one-time code")
    ap.add_argument("--decision", type=int, required=True)
    ap.add_argument("--signer", required=True, help="signer ID")
    ap.add_argument("--name", required=True, help="printed name")
    enum_argument(ap, "--action", load=_actions, leave_out=_not_signable, required=True)
    ap.add_argument("--code", required=True)
    ap.add_argument("--meaning", default=APPROVAL_MEANING)
    ap.add_argument("--rationale")
    ap.set_defaults(func=cmd_escalation_approve)
