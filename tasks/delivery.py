"""Deliver outbox notices through apprise, per channel: nothing lost, nothing sent twice by two passes.

The apprise config is read strictly: a missing, empty or malformed file is an error naming the line
(apprise itself drops a bad line silently), and it never consumes a notice.

A delivery pass first CLAIMS the notices it will send: a claiming UPDATE of `claimed_by` and
`claim_expires_at` in a write transaction (BEGIN IMMEDIATE on SQLite; `FOR UPDATE SKIP LOCKED` on
PostgreSQL), so a concurrent pass skips them. Each (notice, channel) that succeeds is committed as a
delivery row right after the send, so a retry or a restart sends only to the channels that have not
got it; then the notice is recorded delivered, or released for the next pass when a channel failed.
A pass that dies keeps its claims until the lease ends (`NKTRIAL_DELIVERY_LEASE_SECONDS`); then any
pass may take them over. A notice for a role that no channel serves is not claimed: it stays pending
until a channel exists.

Each message ends with " · notice <id>", so a receiver can drop a repeat. The one window left is a
crash (or a lease that ran out) after a channel accepted a message and before its delivery row was
committed: that message may be sent again, with the same notice ID. Delivery is at-least-once.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import os
import pickle
import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from models.clock import wall_clock
from models.db import UnitOfWork
from models.tables import NotificationDelivery, NotificationOutbox, OutboxStatus
from protocol.errors import UserError
from protocol.roles import Role

MAX_ERROR = 300
CLAIM_BATCH = 10  # notices claimed at a time: a batch is sent well within one lease
SETTING = "NKTRIAL_APPRISE_CONFIG"


class ChannelConfigError(UserError):
    """The apprise config cannot be used: one sentence naming the file and, when it is one, the line."""


@dataclass(frozen=True)
class Channel:
    id: str  # digest of the URL: secrets in the URL never reach the database
    tags: frozenset[str]
    server: object  # an apprise plugin instance

    def send(self, title: str, body: str) -> bool:
        return bool(self.server.notify(title=title, body=body))


@dataclass
class DeliveryReport:
    delivered: int = 0
    pending: int = 0  # a channel refused or did not answer: retried on the next pass
    no_channel: int = 0  # waiting: no channel serves the notice's role
    no_channel_roles: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        text = f"{self.delivered} delivered, {self.pending} waiting for a channel that did not answer"
        if self.no_channel:
            text += f", {self.no_channel} waiting: no channel serves {', '.join(self.no_channel_roles)}"
        return text


# -- the apprise config, read strictly -------------------------------------------------------------

def load_channels(config: Path | None) -> list[Channel]:
    """Channels from an apprise config file (YAML or text), each with its tags. None: no channels (a signing code then
    says its signer has none). A file that is missing, empty or has a line apprise cannot load is a ChannelConfigError.

    The file is read every time (a fixed config is used at once). Its line-by-line check (apprise parses each entry)
    and one parse of the whole file (~30 ms each) are done once per distinct text, so that every option (an e-mail's
    from= and to=) and the YAML `asset:` are apprise's own; every call gets new copies of the parsed plugins, never
    used before, so no throttle or connection state is carried from one delivery pass to the next."""
    if config is None:
        return []
    where, text = _read(Path(config))
    _checked(where, text)
    by_id: dict[str, Channel] = {}
    for server in _parsed(text):
        url = server.url(privacy=False)
        cid = hashlib.sha256(url.encode()).hexdigest()[:16]
        tags = frozenset(str(t) for t in server.tags)
        if cid in by_id:  # the same URL listed twice is one channel with both tag sets: it gets a notice once
            tags |= by_id[cid].tags
        by_id[cid] = Channel(id=cid, tags=tags, server=by_id[cid].server if cid in by_id else server)
    return list(by_id.values())


@functools.lru_cache(maxsize=16)
def _checked(where: str, text: str) -> int:
    """How many services a config text loads, once it passed the line-by-line check (a ChannelConfigError is not kept)."""
    return len(_servers(where, text))


def _parsed(text: str) -> list:
    """New apprise plugin instances for a checked config text: copies of one parse of the whole text. A plugin that
    cannot be copied (Matrix and MQTT hold a lock or a client) is taken from a new parse of the text instead."""
    pattern = _parsed_once(text)
    fresh = None
    out = []
    for i, (server, copyable) in enumerate(pattern):
        if copyable:
            out.append(copy.deepcopy(server))
        else:
            fresh = fresh if fresh is not None else _parse(text)
            out.append(fresh[i])
    return out


@functools.lru_cache(maxsize=16)
def _parsed_once(text: str) -> tuple[tuple[object, bool], ...]:
    """The plugins of one parse of a checked config text, each with whether it can be copied (tried by pickling it,
    which builds no half object); kept as the pattern _parsed copies, never sent with."""
    def copyable(server) -> bool:
        try:
            pickle.dumps(server)
            return True
        except Exception:  # noqa: BLE001 - a lock, a socket, a client: not copyable
            return False

    return tuple((server, copyable(server)) for server in _parse(text))


def _parse(text: str) -> tuple:
    from apprise.common import ConfigFormat
    from apprise.config.base import ConfigBase

    if ConfigBase.detect_config_format(text) is ConfigFormat.YAML:
        return tuple(ConfigBase.config_parse_yaml(text)[0])
    return tuple(ConfigBase.config_parse_text(text)[0])


def require_channels(config: Path | None) -> list[Channel]:
    """load_channels() for the outbox: an unset config is an error too, not an empty list of channels."""
    if config is None:
        raise ChannelConfigError(f"{SETTING} is not set: no notice can be delivered until it names an apprise config file")
    return load_channels(config)


def _read(path: Path) -> tuple[str, str]:
    """(how the file is named in an error, its text)."""
    where = f"{SETTING} {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChannelConfigError(f"{where}: the file does not exist") from None
    except IsADirectoryError:
        raise ChannelConfigError(f"{where}: is a folder, not an apprise config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ChannelConfigError(f"{where}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    return where, text


def _servers(where: str, text: str) -> list:
    from apprise.common import ConfigFormat
    from apprise.config.base import ConfigBase

    lines = text.splitlines()
    if not any(_meaningful(line) for line in lines):
        raise ChannelConfigError(f"{where}: the file is empty: it lists no notification URL")
    fmt = ConfigBase.detect_config_format(text)
    if fmt is None:
        bad = next((n for n, line in enumerate(lines, 1) if ConfigBase.detect_config_format(line) is None), 1)
        raise ChannelConfigError(f"{where} line {bad} is neither an apprise URL line nor YAML")
    return _yaml_servers(where, text) if fmt is ConfigFormat.YAML else _text_servers(where, lines, text)


def _meaningful(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith(("#", ";"))


def _scheme(url: object) -> str:
    """How an entry is named in an error: its scheme only, never the rest (a URL may hold a password)."""
    m = re.search(r"([A-Za-z0-9]{1,32})://", str(url))
    return f"the {m.group(1)}:// URL" if m else "the entry"


def _text_servers(where: str, lines: list[str], text: str) -> list:
    from apprise.config.base import ConfigBase

    urls = 0
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not _meaningful(s):
            continue
        if re.match(r"include\s", s, re.IGNORECASE):
            raise ChannelConfigError(f"{where} line {n}: 'include' is not supported: list every URL in this file")
        if "://" not in s:
            if re.fullmatch(r"[\w:-][\w ,:-]*=\s*[\w-][\w ,-]*", s):
                continue  # a tag group assignment: group=tag1,tag2
            raise ChannelConfigError(f"{where} line {n} is not an apprise URL like json://host/path, with its tags before '='")
        loaded, _ = ConfigBase.config_parse_text(line)
        if len(loaded) != 1:
            raise ChannelConfigError(f"{where} line {n}: {_scheme(s)} does not load in apprise (an unknown scheme or a malformed URL)")
        urls += 1
    services, _ = ConfigBase.config_parse_text(text)  # the whole file, so tag groups apply
    if len(services) != urls:
        raise ChannelConfigError(f"{where}: apprise loads {len(services)} of its {urls} URLs")
    return services


def _yaml_servers(where: str, text: str) -> list:
    import yaml
    from apprise.config.base import ConfigBase

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ChannelConfigError(f"{where}{line} is not valid YAML ({getattr(exc, 'problem', None) or 'unreadable'})") from None
    if not isinstance(doc, dict) or not isinstance(root, yaml.MappingNode):
        raise ChannelConfigError(f"{where}: is not an apprise YAML config: it needs a 'urls:' list")
    keys = {k.value: (k, v) for k, v in root.value if isinstance(k, yaml.ScalarNode)}
    if "include" in keys:
        raise ChannelConfigError(f"{where} line {keys['include'][0].start_mark.line + 1}: 'include' is not supported: "
                                 "list every URL in this file")
    if doc.get("version", 1) != 1:
        raise ChannelConfigError(f"{where} line {keys['version'][0].start_mark.line + 1}: apprise reads only version 1")
    if "urls" not in keys:
        raise ChannelConfigError(f"{where}: has no 'urls:' list")
    urls, node = doc["urls"], keys["urls"][1]
    if not isinstance(urls, list) or not urls or not isinstance(node, yaml.SequenceNode):
        raise ChannelConfigError(f"{where} line {keys['urls'][0].start_mark.line + 1}: 'urls:' must be a list of apprise URLs")
    rest = {k: v for k, v in doc.items() if k != "urls"}
    servers = []
    for entry, entry_node in zip(urls, node.value):
        line = entry_node.start_mark.line + 1
        url = next(iter(entry)) if isinstance(entry, dict) and entry else entry
        wanted = len(entry[url]) if isinstance(entry, dict) and isinstance(entry.get(url), list) and entry[url] else 1
        loaded, _ = ConfigBase.config_parse_yaml(yaml.safe_dump({**rest, "urls": [entry]}))
        if len(loaded) < wanted:
            raise ChannelConfigError(f"{where} line {line}: {_scheme(url)} does not load in apprise "
                                     "(an unknown scheme, a malformed URL or a bad option)")
        servers += loaded
    return servers


# -- sending ------------------------------------------------------------------------------------

def send_direct(channels: list[Channel], role: str, *, title: str, body: str) -> int:
    """Send to a role's channels without the outbox (a signing code must not be stored). Returns how many took it."""
    sent = 0
    for ch in channels:
        if role in ch.tags:
            try:
                sent += ch.send(title, body)
            except Exception:  # noqa: BLE001 - a failed channel is counted, not raised
                pass
    return sent


def message_body(body: str, outbox_id: int) -> str:
    """What a channel receives: the stored body and the notice ID, so that a receiver can drop a repeat."""
    return f"{body} · notice {outbox_id}"


@dataclass
class _Claim:
    id: int
    role: str
    title: str
    body: str
    expires_at: dt.datetime
    done: set[str]  # channels that already got it (recorded by an earlier pass)


def _lease_seconds() -> int:
    from tasks.settings import get_settings

    return get_settings().delivery_lease_seconds


def _owner() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def deliver_pending(
    engine: sa.Engine, channels: list[Channel], *, clock: Callable[[], dt.datetime], ids: list[int] | None = None,
    lease_seconds: float | None = None, wall: Callable[[], dt.datetime] = wall_clock,
) -> DeliveryReport:
    """One delivery pass over pending notices (all, or just `ids`): claim a batch, send, record, release; repeat.

    Audit rows carry `clock` (the trial's time); leases are measured on `wall`, the real time processes share.
    """
    report = DeliveryReport()
    lease = dt.timedelta(seconds=lease_seconds if lease_seconds is not None else _lease_seconds())
    served = sorted(r.value for r in Role if any(r.value in c.tags for c in channels))
    owner = _owner()
    after = 0
    while True:
        batch = _claim(engine, owner=owner, roles=served, ids=ids, after=after, lease=lease, clock=clock, wall=wall)
        if not batch:
            break
        after = batch[-1].id
        for note in batch:
            if wall() >= note.expires_at - lease / 4:  # too little lease left to send safely: the next pass takes it over
                report.pending += 1
                continue
            failed = []
            for ch in (c for c in channels if note.role in c.tags and c.id not in note.done):
                try:
                    ok = ch.send(note.title, message_body(note.body, note.id))
                except Exception as exc:  # noqa: BLE001 - a plugin error is a failed send, not a crash
                    ok, reason = False, f"{type(exc).__name__}: {exc}"
                else:
                    reason = "the channel refused or did not answer"
                if ok:
                    _record(engine, note.id, ch.id, clock)
                else:
                    failed.append(f"channel {ch.id}: {reason}")
            _settle(engine, note.id, owner, clock, "; ".join(failed)[:MAX_ERROR] if failed else None)
            if failed:
                report.pending += 1
                report.errors.extend(failed)
            else:
                report.delivered += 1
    report.no_channel, report.no_channel_roles = _unserved(engine, served, ids)
    return report


def _claim(engine, *, owner: str, roles: list[str], ids, after: int, lease: dt.timedelta, clock, wall) -> list[_Claim]:
    """Claim up to CLAIM_BATCH pending notices after `after` that nobody holds (or whose holder's lease ran out)."""
    if not roles:
        return []
    with UnitOfWork(engine, actor="system:delivery", reason=f"delivery pass {owner} claims notices to send", clock=clock) as u:
        now = wall()
        q = (select(NotificationOutbox)
             .where(NotificationOutbox.status == OutboxStatus.PENDING, col(NotificationOutbox.role).in_(roles),
                    NotificationOutbox.id > after,
                    sa.or_(col(NotificationOutbox.claimed_by).is_(None), col(NotificationOutbox.claim_expires_at) <= now))
             .order_by(NotificationOutbox.id).limit(CLAIM_BATCH)
             .with_for_update(skip_locked=True))  # PostgreSQL; SQLite has BEGIN IMMEDIATE (models.db) and ignores it
        if ids is not None:
            q = q.where(col(NotificationOutbox.id).in_(ids))
        rows = u.session.exec(q).all()
        if not rows:
            return []
        expires = now + lease
        for row in rows:
            row.claimed_by, row.claim_expires_at = owner, expires
            u.session.add(row)
        done: dict[int, set[str]] = {}
        for d in u.session.exec(select(NotificationDelivery).where(col(NotificationDelivery.outbox_id).in_([r.id for r in rows]))):
            done.setdefault(d.outbox_id, set()).add(d.channel)
        claims = [_Claim(r.id, r.role.value, r.title, r.body, expires, done.get(r.id, set())) for r in rows]
        u.commit()
    return claims


def _record(engine, outbox_id: int, channel: str, clock) -> None:
    """The delivery row, committed right after the send. One already there (a pass that took over) is kept."""
    try:
        with UnitOfWork(engine, actor="system:delivery", reason=f"delivered to channel {channel}", clock=clock) as u:
            u.session.add(NotificationDelivery(outbox_id=outbox_id, channel=channel, delivered_at=u.at))
            u.commit()
    except sa.exc.IntegrityError:
        pass  # another pass recorded the same (notice, channel) after this one's lease ran out: the documented window


def _settle(engine, outbox_id: int, owner: str, clock, error: str | None) -> None:
    """Record the attempt and release the claim: delivered, or pending for the next pass. A claim another pass took
    over (this one's lease ran out) is left to that pass."""
    reason = "notice delivered" if error is None else "delivery attempt failed; will retry"
    with UnitOfWork(engine, actor="system:delivery", reason=reason, clock=clock) as u:
        row = u.session.get(NotificationOutbox, outbox_id)
        if row is None or row.claimed_by != owner:
            return
        row.attempts, row.last_error = row.attempts + 1, error
        if error is None:
            row.status, row.delivered_at = OutboxStatus.DELIVERED, u.at
        row.claimed_by, row.claim_expires_at = None, None
        u.session.add(row)
        u.commit()


def _unserved(engine, served: list[str], ids) -> tuple[int, list[str]]:
    """Pending notices for roles that no channel serves: how many, and which roles."""
    with Session(engine) as s:
        q = (select(NotificationOutbox.role, func.count()).where(NotificationOutbox.status == OutboxStatus.PENDING)
             .group_by(NotificationOutbox.role))
        if served:
            q = q.where(col(NotificationOutbox.role).not_in(served))
        if ids is not None:
            q = q.where(col(NotificationOutbox.id).in_(ids))
        rows = s.exec(q).all()
    return sum(n for _, n in rows), sorted(r.value for r, _ in rows)
