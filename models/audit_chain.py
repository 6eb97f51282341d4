"""The audit trail's hash chain: pure helpers, no database.

Each audit row carries `prev_hash` (the previous row's `row_hash`; GENESIS for the first row) and
`row_hash` = sha256 over a canonical serialisation of the row's content and `prev_hash`. Changing,
deleting or inserting a row out of band breaks the chain at that row. The serialisation is JSON of
a fixed list (no key order to argue about), the instant in UTC ISO form, UTF-8.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json

GENESIS = "0" * 64
CHAIN_VERSION = "nktrial-audit-v1"
CHAINED_FIELDS = ("id", "at", "actor", "entity", "entity_id", "field", "old_value", "new_value", "reason")


def canonical(row: dict, prev_hash: str) -> bytes:
    """The bytes hashed for one audit row: its content and the hash it follows."""
    at = row["at"]
    if isinstance(at, dt.datetime):
        if at.tzinfo is None:
            raise ValueError("audit instants are aware (UTC)")
        at = at.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")
    values = [CHAIN_VERSION, int(row["id"]), at, *(row[k] for k in CHAINED_FIELDS[2:]), prev_hash]
    return json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def row_hash(row: dict, prev_hash: str) -> str:
    return hashlib.sha256(canonical(row, prev_hash)).hexdigest()
