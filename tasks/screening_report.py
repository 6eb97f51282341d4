"""The screening artifact: every criterion in the protocol's words, with its status, value and limit.

Plain words (MET / NOT MET / UNKNOWN), no emoji: a browser without an emoji font shows empty
boxes. A list, not a wide table, so nothing is cut off in the Prefect UI's artifact page.
"""

from __future__ import annotations

from protocol.eligibility import ScreeningResult, Verdict, criterion_in_words, status_in_words

HEADLINE = {Verdict.ELIGIBLE: "ELIGIBLE", Verdict.NOT_ELIGIBLE: "SCREEN FAILURE: not eligible",
            Verdict.INCOMPLETE: "SCREENING INCOMPLETE: some data missing"}


def screening_markdown(res: ScreeningResult) -> str:
    """The markdown of the `screening-s-001` artifact."""
    earliest = res.earliest_day0_on or "unknown"
    lines = [f"# Screening {res.subject_id}: {HEADLINE[res.verdict]}", "",
             f"Protocol version {res.protocol_version}. Earliest permissible day 0: **{earliest}**"
             + (" (at least: some washout data missing)" if res.earliest_day0_is_lower_bound else "") + ".", ""]
    if res.failing:
        lines += ["**Keeps the candidate out:** " + "; ".join(criterion_in_words(c) for c in res.failing) + ".", ""]
    if res.unknown:
        lines += ["**Unknown (data missing):** " + "; ".join(criterion_in_words(c) for c in res.unknown) + ".", ""]
    headings = {"inclusion": "Inclusion criteria (each must be MET)", "exclusion": "Exclusion criteria (each must be NOT MET)"}
    for kind, heading in headings.items():
        lines += [f"## {heading}", ""]
        for c in (c for c in res.criteria if c.kind == kind):
            lines += [f"- **{criterion_in_words(c)}** — {status_in_words(c)}",
                      f"  - value: {c.value}",
                      f"  - limit: {c.limit}"]
        lines.append("")
    return "\n".join(lines)
