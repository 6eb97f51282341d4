"""`nktrial report`: reports from the trial database."""

from __future__ import annotations

from pathlib import Path

from nktrial.cli.shared import engine, load_protocol, print_json, writable_folder
from protocol.errors import UserError

REPORTS = ["dashboard", "pk", "outcomes", "swimmer", "all"]


def cmd_report(args) -> None:
    import dataclasses

    from sqlmodel import Session

    from models.clock import now
    from protocol.recording import site_today
    from tasks import reports
    from tasks.settings import get_settings

    p = load_protocol(args)
    eng = engine()
    folder = Path(args.out) if args.out else get_settings().data_dir / "reports"
    with Session(eng) as s:
        if args.what == "swimmer":
            from tasks.swimmer import swimmer_png

            target = folder if folder.suffix == ".png" else folder / "swimmer.png"
            writable_folder("--out", target.parent)
            png = swimmer_png(s, p, site_today(p, now()))
            try:
                target.write_bytes(png)
            except OSError as exc:
                raise UserError(f"--out {target} cannot be written ({exc.strerror})") from None
            print(target)
            return
        if args.what == "all":
            writable_folder("--out", folder)
            rs = reports.write_all(s, p, folder, now=now())
            print(f"{len(rs.files)} files in {folder}:")
            print("\n".join(f"  {f}" for f in rs.files))
            return
        report = {"dashboard": lambda: reports.dashboard(s, p), "pk": lambda: reports.pk(s), "outcomes": lambda: reports.outcomes(s, p)}[args.what]()
    if args.json:
        print_json(dataclasses.asdict(report))
    else:
        print(report.markdown())


def add_parsers(sub) -> None:
    rpt = sub.add_parser("report", help="reports from the trial database: dashboard, pk, outcomes, swimmer plot, or all with the exports")
    rpt.add_argument("what", choices=REPORTS)
    rpt.add_argument("--json", action="store_true", help="dashboard, pk, outcomes: JSON instead of markdown")
    rpt.add_argument("--out", default=None, help="swimmer: a .png file or folder; all: a folder (default: data/reports)")
    rpt.set_defaults(func=cmd_report)
