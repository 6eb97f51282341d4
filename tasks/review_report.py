"""The cohort review as people read it: the Resume form's short text and first fields, the review artifact,
what each choice does (naming the patients a stop or de-escalation would leave undosed), and the next cohort's table."""

from __future__ import annotations

from models.tables import EscalationDecision
from protocol.cohorts import TrialState, allowed_choices, design_for
from protocol.definition import ProtocolDefinition
from protocol.three_plus_three import Action, Cohort


def _tally(protocol: ProtocolDefinition, state: TrialState) -> str:
    tallies = design_for(protocol).tallies(state.cohorts)
    return "; ".join(f"DL{lv} {t.n} patient{'s' if t.n != 1 else ''}, {t.dlts} DLT{'s' if t.dlts != 1 else ''}"
                     for lv, t in tallies.items() if t.n)


def _recommended(d: EscalationDecision) -> str:
    return f"{d.recommended_action}" + (f" to DL{d.recommended_level}" if d.recommended_level else "") + (f", MTD DL{d.mtd}" if d.mtd else "")


def signing_statement(protocol: ProtocolDefinition) -> str:
    return (f"By signing you make this decision with your one-time code. The signature records your staff ID, the register's printed "
            f"name, the site time ({protocol.timezone}), the meaning you choose and the decision it signs; it cannot be changed.")


def review_form_markdown(protocol: ProtocolDefinition, state: TrialState, d: EscalationDecision, *, refused: str | None = None,
                         details_url: str | None = None) -> str:
    """The Resume form's short text, all above the fold: a refusal first, then the tally, the recommendation, the choices the PI
    may sign, the signing statement, and the link to the full review."""
    k = design_for(protocol).cohort_size
    lines = [f"**Signature refused:** {refused}. Nothing was signed; the review still waits. Correct it and submit again.", ""
             ] if refused else []
    lines += [f"**Cohort review DL{d.from_level} · decision {d.id}**", "",
              f"**Tally:** {_tally(protocol, state)} (`{d.history}`)" + (" · **early stop: 2 DLTs at this level**" if d.early_stop else ""),
              "", f"**3+3 recommends: {_recommended(d)}.**", "",
              "**You may sign:** " + " · ".join(f"`{a}` ({effect})" for a, effect, allowed in _choices(d, k, state.undosed) if allowed), "",
              f"**Statement:** {signing_statement(protocol)}"]
    if details_url:
        lines += ["", f"[Full review: each patient, the rule applied, the next cohort →]({details_url})"]
    return "\n".join(lines)


def review_form_fields(protocol: ProtocolDefinition, state: TrialState, d: EscalationDecision, *, refused: str | None = None) -> dict:
    """The Resume form's first two fields' titles and descriptions, which carry the facts: the UI squeezes the form's
    markdown text to nothing when the fields fill the window (seen in prefect 3.9.1 at 1280x800), but a field's title and
    description always show. A refusal comes first."""
    k = design_for(protocol).cohort_size
    tally = f"Tally: {_tally(protocol, state)} ({d.history})" + (", early stop: 2 DLTs at this level" if d.early_stop else "")
    allowed = "You may sign: " + "; ".join(f"{a} ({effect})" for a, effect, ok in _choices(d, k, state.undosed) if ok)
    return {"decision_title": f"Decision · 3+3 recommends {_recommended(d)}",
            "decision_description": (f"SIGNATURE REFUSED: {refused}. Nothing was signed; correct it and submit again. " if refused else "")
            + f"{tally}. {allowed}.",
            "meaning_title": "Meaning of your signature",
            "meaning_description": f"Statement: {signing_statement(protocol)}"}


def review_markdown(protocol: ProtocolDefinition, state: TrialState, d: EscalationDecision, signed=None) -> str:
    """The cohort-review artifact (one per review, updated in place): the signed decision once signed (`signed`: a
    tasks.signatures.SignedDecision), the tally, the recommendation and rule, what each choice does, each patient, the next cohort."""
    design = design_for(protocol)
    tallies = design.tallies(state.cohorts)
    status = f"signed {signed.what} by {signed.signer_id}" if signed else "waiting for the PI's signature"
    lines = [f"# Cohort review DL{d.from_level} · decision {d.id} · {status}", ""]
    if signed:
        lines += [f"**Signed {signed.what}** by {signed.signer_id} ({signed.printed_name}) on {signed.signed_at_site}.", "",
                  f"Meaning: {signed.meaning}" + (f" · Rationale: {signed.rationale}" if signed.rationale else ""), ""]
    lines += [f"Outcome history (3+3 notation): `{d.history}`" + (" — **early stop: 2 DLTs at this level**" if d.early_stop else ""),
              "",
              "| level | patients | DLTs |", "|---|---|---|"]
    lines += [f"| DL{lv} | {t.n} | {t.dlts} |" for lv, t in tallies.items() if t.n]
    lines += ["", f"3+3 recommends **{_recommended(d)}**.", ""]
    if state.recommendation:
        lines += [f"Rule applied: {state.recommendation.reason}.", ""]
    lines += ["What each choice does (the PI may choose the recommendation or a more cautious action):", ""]
    lines += _choice_lines(d, design.cohort_size, state.undosed)
    rows = cohort_status_table(state)
    if rows:
        lines += ["", "## Patients", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    nxt = next_cohort_table(protocol, state)
    if nxt:
        lines += ["", "## The next cohort", "", nxt]
    lines += ["", "## Signing statement", "", signing_statement(protocol)]
    return "\n".join(lines)


def _choices(d: EscalationDecision, k: int, undosed: dict[int, list[str]] | None = None) -> list[tuple[str, str, bool]]:
    """(choice, what it does, whether the PI may take it here: protocol.cohorts.allowed_choices). A stop or de-escalation
    names the enrolled patients not yet dosed whom it takes off study (tasks.closure)."""
    undosed = undosed or {}

    def off(levels) -> str:
        names = [sid for lv in levels for sid in undosed.get(lv, [])]
        return f"; {', '.join(names)} (enrolled, not yet dosed) will not be dosed and go off study" if names else ""

    effects = {
        Action.ESCALATE: f"close DL{d.from_level}, open {k} slots at DL{d.from_level + 1}",
        Action.EXPAND: f"open {k} more slots at DL{d.from_level}",
        Action.DEESCALATE: (f"close DL{d.from_level}, open {k} slots at DL{d.from_level - 1}" + off([d.from_level])
                            if d.from_level > 1 else "not possible at DL1"),
        Action.STOP: "close enrollment for the trial and tell everyone" + off(sorted(undosed)),
    }
    refusals = allowed_choices(Action(d.recommended_action), d.from_level, d.early_stop)
    return [(action.value, effect, refusals[action] is None) for action, effect in effects.items()]


def _choice_lines(d: EscalationDecision, k: int, undosed: dict[int, list[str]] | None = None) -> list[str]:
    """One line a choice: what it does, and whether the PI may take it here."""
    return [f"- `{a}` — {effect}" + ("" if allowed else " *(not allowed here)*") for a, effect, allowed in _choices(d, k, undosed)]


def cohort_status_table(state: TrialState) -> list[dict]:
    return [{"subject": p.subject_id, "dose level": p.dose_level, "cohort": p.cohort, "status": p.status,
             "counts as": {"T": "DLT", "N": "no DLT"}.get(p.letter or "", "—")} for p in state.patients]


def next_cohort_table(protocol: ProtocolDefinition, state: TrialState) -> str:
    """The decision table for the next cohort: each possible outcome and where the rule would go."""
    design = design_for(protocol)
    rec = state.recommendation
    if rec is None or rec.dose_level is None:
        return ""
    rows = ["| next cohort at DL%d | then 3+3 says |" % rec.dose_level, "|---|---|"]
    for outcome in ("NNN", "TNN", "TTN"):
        shown = outcome if outcome != "TTN" else "TT"
        nxt = design.decide([*state.cohorts, Cohort(rec.dose_level, shown)])
        where = f" DL{nxt.dose_level}" if nxt.dose_level else ""
        mtd = f", MTD DL{nxt.mtd}" if nxt.mtd else ""
        rows.append(f"| {outcome.count('T') if outcome != 'TTN' else '2+'} DLT | {nxt.action.value}{where}{mtd} |")
    return "\n".join(rows)


# -- a patient's schedule, screening and daily rounds (the flows' artifacts) ----------------------
