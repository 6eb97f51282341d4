"""What every command group shares: reading the user's input, wiring the protocol, engine and clock,
and printing tables, JSON and errors.

Nothing heavy is imported here at module level: building the parser must stay cheap.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path

from protocol.errors import UserError, first_validation_error

EXIT_USER_ERROR = 2


# -- choices --------------------------------------------------------------------------------------

class EnumChoices:
    """An enum's values as argparse `choices=`, read when argparse first asks for them."""

    def __init__(self, load: Callable[[], type[Enum]], leave_out: Callable[[], set] | None = None):
        self._load, self._leave_out = load, leave_out
        self._values: list[str] | None = None

    def _list(self) -> list[str]:
        if self._values is None:
            left_out = self._leave_out() if self._leave_out else set()
            self._values = [m.value for m in self._load() if m not in left_out]
        return self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._list())

    def __contains__(self, value: object) -> bool:
        return value in self._list()

    def __len__(self) -> int:
        return len(self._list())


def enum_argument(parser, *flags: str, load: Callable[[], type[Enum]], leave_out: Callable[[], set] | None = None, **kwargs):
    """`parser.add_argument(*flags, choices=<the enum's values>, **kwargs)`, with the enum imported only when this
    subcommand's help or value check needs it: building the whole parser then imports no database or service code,
    and `nktrial --help` or `nktrial escalation next` stays instant. (Given to add_argument, choices are listed at once.)"""
    action = parser.add_argument(*flags, **kwargs)
    action.choices = EnumChoices(load, leave_out)
    return action


# -- input ----------------------------------------------------------------------------------------

def local_datetime(flag: str, text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a local date and time like 2027-01-31T09:00") from None
    if value.tzinfo is not None:
        raise UserError(f"{flag} '{text}' has a UTC offset; give the site's local wall-clock time without one")
    return value


def local_date(flag: str, text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a date like 2027-01-31") from None


def yes_no(flag: str, text: str | None) -> bool | None:
    if text is None:
        return None
    if text.lower() in ("yes", "y", "true"):
        return True
    if text.lower() in ("no", "n", "false"):
        return False
    raise UserError(f"{flag} '{text}' must be yes or no")


def validated(cls, data: dict, what: str):
    """`cls` (a pydantic model) from the options given; the first invalid one becomes one sentence."""
    from pydantic import ValidationError

    try:
        return cls.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        raise UserError(first_validation_error(exc, what)) from None


def read_screening(path: str):
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


# -- wiring: protocol, engine, clock --------------------------------------------------------------

def load_protocol(args):
    """The protocol named by --protocol, or the one the settings name."""
    from protocol.definition import load_protocol as load

    path = args.protocol
    if path is None:
        from tasks.settings import get_settings

        path = get_settings().protocol_file
    return load(path)


def engine():
    """The trial database's engine, connected once, or one sentence saying why it cannot be."""
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


def writer(args):
    """(engine, protocol, clock) for a write: the same operations as the flows, straight to the trial database."""
    from models.clock import wall_clock
    from tasks.runtime import protocol

    return engine(), protocol() if args.protocol is None else load_protocol(args), wall_clock


def deliver_now(args) -> None:
    """Send what the write put in the outbox; a channel that is down keeps it pending, not lost."""
    from tasks.delivery import deliver_pending, load_channels
    from tasks.settings import get_settings

    engine_, _, clock = writer(args)
    report = deliver_pending(engine_, load_channels(get_settings().apprise_config), clock=clock)
    if report.pending:
        print(f"note: {report.pending} notice(s) wait in the outbox for a channel that did not answer; `nktrial notify deliver` retries")


def sync_projection(subject_id: str) -> None:
    """Ask the Prefect server, if one is configured, to re-project the patient's runs."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        print("note: PREFECT_API_URL is not set; the patient's scheduled runs catch up at the next daily rounds")
        return
    from prefect.deployments import run_deployment

    run = run_deployment("patient-treatment/patient-treatment", parameters={"subject": {"subject_id": subject_id}},
                         timeout=0, as_subflow=False, flow_run_name=f"{subject_id} · treatment plan")
    print(f"patient-treatment run {run.id} re-projects {subject_id}'s scheduled runs")


# -- output ---------------------------------------------------------------------------------------

def print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def print_error(exc: Exception) -> int:
    """One sentence on stderr, no traceback; the exit status for an error the user can fix."""
    print(f"nktrial: error: {exc}", file=sys.stderr)
    return EXIT_USER_ERROR
