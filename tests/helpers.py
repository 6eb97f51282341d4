"""Protocol variants for tests: the shipped file with one key changed."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import time
import urllib.error
import urllib.request

import yaml

from protocol.definition import DEFAULT_PROTOCOL_FILE

RAW = yaml.safe_load(DEFAULT_PROTOCOL_FILE.read_text(encoding="utf-8"))
DELETE = object()


def protocol_data_with(path: str, value) -> dict:
    """A deep copy of the shipped protocol data with the dotted `path` set to `value` (or deleted)."""
    data = copy.deepcopy(RAW)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    if value is DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


# -- the staff register the tests write as ---------------------------------------------------------

# (staff ID, printed name, roles, channel tag): each one's own channel is tagged staff:<ID> (the tests' receiver gives it the
# path <ID>); a role's shared tag is never a signer's own channel, so signing codes would be refused to it.
TEST_STAFF = [
    ("pi-01", "Principal Investigator", "pi,investigator", "staff:pi-01"),
    ("coord-1", "Coordinator One", "coordinator", "staff:coord-1"),
    ("nurse-7", "Nurse Seven", "nurse", "staff:nurse-7"),
    ("nurse-1", "Nurse One", "nurse", "staff:nurse-1"),
    ("inv-2", "Investigator Two", "investigator", "staff:inv-2"),
    ("pharm-1", "Pharmacist One", "pharmacy", "staff:pharm-1"),
    ("safety-1", "Safety Desk One", "safety", "staff:safety-1"),
]
STAFF_SINCE = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)  # before every test's clock


def register_staff(engine, protocol=None, staff=TEST_STAFF, *, since: dt.datetime = STAFF_SINCE) -> None:
    """The PI first (the bootstrap), then everyone else added by the PI: the same path as `nktrial staff add`."""
    from protocol.definition import load_protocol
    from tasks.staff import add_staff

    p = protocol or load_protocol()
    (pi_id, *_), clock = staff[0], (lambda: since)
    for staff_id, name, roles, tag in staff:
        add_staff(engine, p, staff_id=staff_id, printed_name=name, roles=roles, channel_tag=tag, actor=None if staff_id == pi_id else pi_id,
                  clock=clock, allow_bootstrap=staff_id == pi_id)


def notice_link(body: str) -> str:
    """The run or page link of a notice body (subject · event · … · link · notice N)."""
    return next(part for part in body.split(" · ") if part.startswith(("http://", "https://")))


def call_api(url: str, *, auth: str | None = None, body: dict | None = None, method: str | None = None) -> tuple[int, dict]:
    """One request to a Prefect API as a plain HTTP client (basic auth if given): (status, JSON body or {})."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method or ("POST" if data is not None else "GET"))
    tries = 0
    while True:
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            # A SQLite Prefect server answers 503 when a write loses a race with its own event writers, having written
            # nothing (tasks/prefect_api.py); Prefect's clients try again, and so does this one, up to 5 times.
            tries += 1
            if exc.code != 503 or tries == 5:
                return exc.code, {}
        time.sleep(0.5)
