"""Commands that need no database and no Prefect: the protocol, a calendar, a screening, and the 3+3 rule
(`escalation next`, `oc`, `paths`). They must stay fast: nothing here imports Prefect."""

from __future__ import annotations

from nktrial.cli.shared import load_protocol, local_date, local_datetime, print_json, read_screening, table
from protocol.errors import UserError

# -- protocol -------------------------------------------------------------------------------------

def cmd_protocol_show(args) -> None:
    p = load_protocol(args)
    if args.json:
        print_json(p.model_dump(mode="json"))
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

    p = load_protocol(args)
    day0 = local_datetime("--day0", args.day0)
    actuals = {}
    for item in args.actual or []:
        num, _, when = item.partition("=")
        if not num.isdigit() or not when:
            raise UserError(f"--actual '{item}' must look like 2=2027-02-16T09:00 (infusion number = local date and time)")
        actuals[int(num)] = local_datetime("--actual", when)
    cal = compute_calendar(p, dose_level=args.dose_level, day0=day0, actual_infusions=actuals)
    if args.json:
        print_json([e.as_dict() for e in cal.events])
        return
    print(f"Dose level {cal.dose_level} ({cal.cells_per_infusion:.1e} cells/infusion), day 0 {cal.day0:%Y-%m-%d %H:%M} {cal.timezone}, "
          f"protocol {cal.protocol_version}\n")
    rows = [[str(e.protocol_day), e.local_date.isoformat(), e.local_time.strftime("%H:%M") if e.local_time else "24:00",
             e.label, f"{e.window_start}…{e.window_end}" if e.window_start != e.window_end else "", " ".join(e.flags)]
            for e in cal.events]
    print(table(rows, ["day", "date", "time", "event", "window", "flags"]))


# -- screening ------------------------------------------------------------------------------------

def cmd_screen(args) -> None:
    from protocol.eligibility import screen

    p = load_protocol(args)
    rec = read_screening(args.file)
    day0_on = local_date("--day0", args.day0) if args.day0 else None
    res = screen(p, rec, day0_on=day0_on)
    if args.json:
        print_json(res.model_dump(mode="json"))
        return
    mark = {True: "ok", False: "FAIL", None: "?"}
    rows = [[mark[c.allows_enrollment], c.id, c.status.value, c.value, c.limit] for c in res.criteria]
    print(f"Screening {res.subject_id} (protocol {res.protocol_version})\n")
    print(table(rows, ["", "criterion", "status", "value", "limit"]))
    earliest = res.earliest_day0_on
    bound = " (at least: some washout data are missing)" if res.earliest_day0_is_lower_bound else ""
    print(f"\nEarliest permissible day 0: {earliest or 'unknown'}{bound}")
    print(f"Verdict: {res.verdict.value.replace('_', ' ').upper()}")
    for c in res.failing:
        print(f"  fails {c.id}: {c.reason}")
    for c in res.unknown:
        print(f"  unknown {c.id}: {c.reason}")


# -- the 3+3 rule ---------------------------------------------------------------------------------

def _design(args):
    from protocol.cohorts import design_for

    return design_for(load_protocol(args))


MAX_PATHS_SHOWN = 10_000  # more rows than any 3+3 design with a handful of levels has paths


def _probabilities(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--p '{text}' must be DLT probabilities separated by commas, e.g. 0.05,0.15,0.30") from None


def cmd_escalation_next(args) -> None:
    decision = _design(args).next_action_in_full_notation(args.history)
    if args.json:
        print_json(decision.as_dict())
        return
    where = f" {decision.patients} at level {decision.dose_level}" if decision.dose_level else ""
    mtd = f"; MTD: level {decision.mtd}" if decision.mtd else ("; no tolerable dose" if decision.action.value == "stop" else "")
    print(f"{decision.action.value}{where}{mtd}\n{decision.reason}")


def cmd_escalation_oc(args) -> None:
    from protocol.operating import operating_characteristics

    try:
        oc = operating_characteristics(_design(args), _probabilities(args.p))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print_json(oc.as_dict())
        return
    rows = [[f"DL{k}", f"{oc.p[k - 1]:.2f}", f"{oc.p_mtd[k]:.4f}", f"{oc.expected_patients[k]:.2f}", f"{oc.expected_dlts[k]:.2f}"]
            for k in oc.p_mtd]
    print(f"3+3, exact over {oc.paths} dose paths\n")
    print(table(rows, ["level", "true P(DLT)", "P(declared MTD)", "E[patients]", "E[DLTs]"]))
    print(f"\nP(no tolerable dose) = {oc.p_no_tolerable_dose:.4f}; E[patients] in all = {sum(oc.expected_patients.values()):.2f}")


def cmd_escalation_paths(args) -> None:
    from protocol.operating import dose_paths
    from protocol.plausible import count_in_range, probabilities

    design = _design(args)
    count_in_range("--limit", args.limit, 1, MAX_PATHS_SHOWN)
    p = probabilities("--p", _probabilities(args.p), design.num_levels) if args.p is not None else None
    paths = dose_paths(design)
    rows = [{"history": x.history, "mtd": x.final.mtd, "patients": sum(c.n for c in x.cohorts),
             **({"probability": x.probability(p)} if p else {})} for x in paths]
    if p:
        rows.sort(key=lambda r: -r["probability"])
    if args.json:
        print_json(rows)
        return
    header = ["history", "MTD", "patients"] + (["probability"] if p else [])
    print(table([[r["history"], str(r["mtd"] or "none"), str(r["patients"])] + ([f"{r['probability']:.6f}"] if p else [])
                 for r in rows[: args.limit]], header))
    print(f"\n{len(paths)} paths" + (f"; the {args.limit} shown" if args.limit < len(paths) else ""))


# -- the parsers ----------------------------------------------------------------------------------

def add_parsers(sub) -> None:
    """protocol show, calendar, screen."""
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


def add_escalation_parsers(esc) -> None:
    """escalation next, oc, paths."""
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
