"""`nktrial escalation status|code|approve (sign)`: the trial's 3+3 state from the database, and the PI's signature.

(The pure `escalation next|oc|paths` are in nktrial.cli.pure.) The services are imported
inside each command: building the parser stays cheap.
"""

from __future__ import annotations

from nktrial.cli.shared import actor, api_auth, deliver_now, enum_argument, record_id, table, writer
from protocol.errors import UserError


def _actions():
    from protocol.three_plus_three import Action

    return Action


def _not_signable() -> set:
    from protocol.three_plus_three import Action

    return {Action.ENROLL}  # the rule's own first step; a review never ends in it


def cmd_escalation_status(args) -> None:
    from sqlmodel import Session

    from tasks.escalation_gate import trial_state, waiting_reviews
    from tasks.review_report import cohort_status_table

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
    """Send a one-time code for (decision, signer) to the signer's own channel. The code is never printed."""
    from tasks.delivery import load_channels
    from tasks.escalation_gate import open_review
    from tasks.settings import get_settings
    from tasks.signatures import send_decision_code

    engine, p, clock = writer(args)
    signer = args.signer or actor(args)
    d = open_review(engine, p, clock=clock)
    if d is None or d.id != args.decision:
        raise UserError(f"decision {args.decision} is not the review waiting now; see nktrial escalation status")
    sent = send_decision_code(engine, p, load_channels(get_settings().apprise_config), decision_id=args.decision, signer_id=signer,
                              clock=clock, actor=actor(args, required=False) or signer)
    print(f"one-time signing code for decision {args.decision} {sent.sentence} (valid {p.escalation.signing_code_valid_hours.value} h; "
          f"{signer}'s earlier codes for it stop working)")


def cmd_escalation_approve(args) -> None:
    import uuid

    from protocol.three_plus_three import Action
    from tasks.signatures import sign_decision

    engine, p, clock = writer(args)
    out = sign_decision(engine, p, decision_id=args.decision, signer_id=args.signer or actor(args), printed_name=args.name,
                        action=Action(args.action), rationale=args.rationale, code=args.code, meaning=args.meaning,
                        attempt_key=f"cli-{uuid.uuid4().hex[:12]}", clock=clock)
    if not out.accepted:
        deliver_now(args)  # a lockout tells the safety desk and the PI
        raise UserError(f"signature refused: {out.reason}")
    print(f"decision {args.decision} {out.reason}")
    deliver_now(args)
    _complete_review_run(args.decision)


def _complete_review_run(decision_id: int) -> None:
    """With PREFECT_API_URL set: the paused review run completes showing the signed decision, its artifact shows the signature,
    and the runs a stop or de-escalation closes are cancelled (flows.safety.complete_signed_review)."""
    import os

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        print("note: PREFECT_API_URL is not set, so the review run still shows Paused in the Prefect UI; the decision is signed "
              "and in force")
        return
    from flows.safety import complete_signed_review

    try:
        with api_auth(api):
            run_id = complete_signed_review(decision_id)
    except Exception as exc:  # the signature is committed; only the UI's view of it is behind
        print(f"note: the decision is signed and in force, but the Prefect UI could not be updated ({type(exc).__name__}); "
              "the review run and the undosed patients' runs catch up at daily rounds")
        return
    if run_id:
        print(f"cohort-review run {run_id} completed in the Prefect UI with the signed decision")


def add_parsers(esc) -> None:
    """escalation status, code, approve (after next, oc, paths)."""
    st = esc.add_parser("status", help="the trial's outcome history, each patient's DLT status, reviews waiting")
    st.set_defaults(func=cmd_escalation_status)
    code = esc.add_parser("code", help="send a one-time signing code for the review waiting now to the signer's own channel (never printed)")
    code.add_argument("--decision", type=record_id, required=True)
    code.add_argument("--signer", help="the signer's staff ID (default: --as or NKTRIAL_ACTOR); the code goes to their channel only")
    code.set_defaults(func=cmd_escalation_code)
    ap = esc.add_parser("approve", aliases=["sign"], help="sign the waiting decision with a one-time code")
    ap.add_argument("--decision", type=record_id, required=True)
    ap.add_argument("--signer", help="your staff ID (default: --as or NKTRIAL_ACTOR)")
    ap.add_argument("--name", help="your printed name; if given, it must match the staff register's")
    enum_argument(ap, "--action", load=_actions, leave_out=_not_signable, required=True)
    ap.add_argument("--code", required=True)
    ap.add_argument("--meaning", required=True, help="what your signature means: one of the protocol file's "
                    "escalation.signature_meanings, in full or by its first word (e.g. approval)")
    ap.add_argument("--rationale")
    ap.set_defaults(func=cmd_escalation_approve)
