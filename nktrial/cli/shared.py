"""What every command group shares: reading the user's input, wiring the protocol, engine and clock,
and printing tables, JSON and errors.

Nothing heavy is imported here at module level: building the parser must stay cheap.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    """Site-local wall time as typed: 2027-01-31T09:00 or 2027-01-31 09:00 (as in the forms), read in the protocol's zone."""
    text = text.strip()
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a local date and time like 2027-01-31T09:00 or 2027-01-31 09:00") from None
    if value.tzinfo is not None:
        raise UserError(f"{flag} '{text}' has a UTC offset; give the site's local wall-clock time without one")
    if len(text) <= 10:  # a date alone would silently mean 00:00
        raise UserError(f"{flag} '{text}' has no time of day; give the site's local date and time, e.g. {text} 09:00")
    from protocol.plausible import plausible_date

    return plausible_date(flag, value)


def local_date(flag: str, text: str) -> dt.date:
    try:
        value = dt.date.fromisoformat(text)
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a date like 2027-01-31") from None
    from protocol.plausible import plausible_date

    return plausible_date(flag, value)


MAX_RECORD_ID = 2**31 - 1  # the largest id either engine's integer key holds; a larger one overflows SQLite's driver


def record_id(text: str) -> int:
    """An argparse type for a record's id (--ae, --decision): a whole number from 1 to MAX_RECORD_ID."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a record id (a whole number)") from None
    if not 1 <= value <= MAX_RECORD_ID:
        raise argparse.ArgumentTypeError(f"{text} is not a record id: ids run from 1 to {MAX_RECORD_ID}")
    return value


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


MAX_INPUT_FILE_BYTES = 1_000_000  # a screening record is a few kB and the protocol file tens of kB; more is the wrong file


def input_file(what: str, path: Path | str) -> Path:
    """A regular file of a sane size, or one sentence: a device or a pipe (/dev/zero) would be read forever."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if not p.is_file():
        raise UserError(f"{what} {path}: is not a regular file")
    if st.st_size > MAX_INPUT_FILE_BYTES:
        raise UserError(f"{what} {path}: is {st.st_size} bytes; at most {MAX_INPUT_FILE_BYTES} are read")
    try:
        p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path}: is not UTF-8 text") from None
    return p


def read_screening(path: str):
    from pydantic import ValidationError

    from protocol.eligibility import ScreeningRecord

    try:
        text = input_file("screening file", path).read_text(encoding="utf-8")
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
        from tasks.settings import protocol_file_setting

        path = protocol_file_setting()
    if path is not None:
        input_file("protocol file", path)
    return load(path)


def engine():
    """The trial database's engine, connected once, or one sentence saying why it cannot be."""
    import sqlalchemy as sa

    from models.db import make_engine
    from tasks.settings import get_settings

    settings = get_settings()
    url = settings.trial_database_url
    if not settings.database_url and settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise UserError(f"NKTRIAL_DATA_DIR {settings.data_dir} is a file, not a folder; point it at a folder for the trial database")
    try:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        raise UserError(f"NKTRIAL_DATABASE_URL '{url}' is not a database URL like postgresql+psycopg://user@host/db") from None
    try:
        engine = make_engine(url)
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar()
    except (sa.exc.NoSuchModuleError, ImportError):
        raise UserError(f"NKTRIAL_DATABASE_URL {shown}: this database kind is not supported; use postgresql+psycopg://user@host/db, "
                        "or leave it unset for the embedded SQLite file") from None
    except sa.exc.ArgumentError:
        raise UserError(f"NKTRIAL_DATABASE_URL '{shown}' is not a database URL like postgresql+psycopg://user@host/db") from None
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "no connection"
        raise UserError(f"trial database {shown} is not reachable ({reason})") from None
    except sa.exc.DatabaseError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "unreadable"
        raise UserError(f"trial database {shown} cannot be read as a database ({reason})") from None
    except OSError as exc:
        raise UserError(f"trial database {shown} cannot be opened ({exc.strerror})") from None
    return engine


def writable_folder(flag: str, folder: Path) -> Path:
    """A folder output can be written to, created if missing; else one sentence saying why not."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder; give a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {folder} cannot be created ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not writable")
    return folder


def database_problem(exc: Exception) -> str | None:
    """One sentence for a database error a person can fix (no schema yet, not a database); None for anything else."""
    import sqlalchemy as sa

    if not isinstance(exc, sa.exc.DBAPIError):
        return None
    text = str(exc.orig) if exc.orig is not None else str(exc)
    if "no such table" in text or "UndefinedTable" in type(exc.orig).__name__ or "does not exist" in text and "relation" in text:
        return "the trial database has no tables yet: run `nktrial db upgrade` first"
    if "file is not a database" in text:
        return "the trial database file is not a database: point NKTRIAL_DATABASE_URL or NKTRIAL_DATA_DIR at the trial database"
    return None


NAME_YOURSELF = ("say who is writing: give your staff ID before the command, e.g. `nktrial --as nurse-01 record ...`, "
                 "or set NKTRIAL_ACTOR=nurse-01 (`nktrial staff list` shows the register)")


def actor(args, *, required: bool = True) -> str | None:
    """The staff ID a CLI write is made as: --as, else NKTRIAL_ACTOR. The one place a CLI write picks its actor;
    whether that person may write is `tasks.staff.authorize`, in the write's own transaction."""
    given = args.actor
    if given is None:
        from tasks.settings import get_settings

        given = get_settings().actor
    given = (given or "").strip()
    if not given and required:
        raise UserError(NAME_YOURSELF)
    if given:
        from protocol.roles import staff_id_problem

        if problem := staff_id_problem(given):
            raise UserError(f"--as / NKTRIAL_ACTOR: {problem}")
    return given or None


def writer(args):
    """(engine, protocol, clock) for a write: the same operations as the flows, straight to the trial database."""
    from models.clock import wall_clock
    from tasks.runtime import protocol
    from tasks.settings import get_settings

    if args.protocol is None and (path := get_settings().protocol_file) is not None:
        input_file("NKTRIAL_PROTOCOL_FILE", path)
    return engine(), protocol() if args.protocol is None else load_protocol(args), wall_clock


def deliver_now(args) -> None:
    """Send what the write put in the outbox. The write is recorded whatever happens here: a channel that is down, a
    role with no channel or an apprise config that cannot be read keeps the notices pending, not lost (a warning)."""
    from tasks.delivery import ChannelConfigError, deliver_pending, require_channels
    from tasks.settings import get_settings

    engine_, _, clock = writer(args)
    try:
        channels = require_channels(get_settings().apprise_config)
    except ChannelConfigError as exc:
        print(f"warning: {exc}. The write is recorded; its notices wait in the outbox until `nktrial notify deliver` "
              "runs with a working config", file=sys.stderr)
        return
    report = deliver_pending(engine_, channels, clock=clock)
    if report.pending:
        print(f"note: {report.pending} notice(s) wait in the outbox for a channel that did not answer; `nktrial notify deliver` retries")
    if report.no_channel:
        print(f"note: {report.no_channel} notice(s) wait in the outbox: no channel serves {', '.join(report.no_channel_roles)} "
              "in the apprise config")


@contextmanager
def api_auth(api_url: str) -> Iterator[str | None]:
    """Around a command's calls to the Prefect API: the basic-auth string it sends (PREFECT_API_AUTH_STRING, or, for a
    server on this machine, the one `nktrial up` keeps in the data folder; see nktrial/apiauth.py). Never printed."""
    import os

    from nktrial.apiauth import client_auth
    from tasks.settings import get_settings

    auth = client_auth(api_url, get_settings().data_dir)
    if not auth or os.environ.get("PREFECT_API_AUTH_STRING"):
        yield auth
        return
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    with temporary_settings({PREFECT_API_AUTH_STRING: auth}):
        yield auth


def sync_projection(subject_id: str) -> None:
    """Ask the Prefect server, if one is configured, to re-project the patient's runs."""
    import os

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        print("note: PREFECT_API_URL is not set; the patient's scheduled runs catch up at the next daily rounds")
        return
    import httpx
    from prefect.deployments import run_deployment

    from nktrial.apiauth import refused_message
    from tasks.settings import get_settings

    with api_auth(api):
        try:
            run = run_deployment("patient-treatment/patient-treatment", parameters={"subject": {"subject_id": subject_id}},
                                 timeout=0, as_subflow=False, flow_run_name=f"{subject_id} · treatment plan")
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 401:
                raise
            print(f"warning: {refused_message(api, get_settings().data_dir)}. The write is recorded; the patient's "
                  "scheduled runs catch up at the next daily rounds", file=sys.stderr)
            return
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
