"""Deliver outbox notices through apprise, per channel, so nothing is lost or sent twice.

Each (notice, channel) that succeeds is committed as a delivery row right after the send, so a
retry or a restart sends only to the channels that have not got it. A channel that is down
leaves the notice pending for the next pass; no channel for a role records `no_channel`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session, select

from models.db import UnitOfWork
from models.tables import NotificationDelivery, NotificationOutbox, OutboxStatus

MAX_ERROR = 300


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
    pending: int = 0
    no_channel: int = 0
    errors: list[str] = field(default_factory=list)


def load_channels(config: Path | None) -> list[Channel]:
    """Channels from an apprise config file (YAML or text), each with its role tags. None: no channels."""
    if config is None:
        return []
    import apprise

    if not Path(config).is_file():
        raise ValueError(f"apprise_config: file {config} does not exist")
    cfg = apprise.AppriseConfig()
    cfg.add(str(config))
    ap = apprise.Apprise()
    ap.add(cfg)
    channels = []
    for server in ap:
        url = server.url(privacy=False)
        channels.append(Channel(id=hashlib.sha256(url.encode()).hexdigest()[:16], tags=frozenset(str(t) for t in server.tags), server=server))
    return channels


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


def deliver_pending(
    engine: sa.Engine, channels: list[Channel], *, clock: Callable[[], dt.datetime], ids: list[int] | None = None
) -> DeliveryReport:
    """One delivery pass over pending notices (all, or just `ids`)."""
    report = DeliveryReport()
    with Session(engine) as s:
        q = select(NotificationOutbox).where(NotificationOutbox.status == OutboxStatus.PENDING).order_by(NotificationOutbox.id)
        if ids is not None:
            q = q.where(NotificationOutbox.id.in_(ids))
        pending = s.exec(q).all()
        done = {(d.outbox_id, d.channel) for d in s.exec(select(NotificationDelivery).where(
            NotificationDelivery.outbox_id.in_([p.id for p in pending])))} if pending else set()
    for note in pending:
        targets = [c for c in channels if note.role in c.tags]
        if not targets:
            _finish(engine, note.id, OutboxStatus.NO_CHANNEL, clock, None)
            report.no_channel += 1
            continue
        failed = []
        for ch in targets:
            if (note.id, ch.id) in done:
                continue
            try:
                ok = ch.send(note.title, note.body)
            except Exception as exc:  # noqa: BLE001 - a plugin error is a failed send, not a crash
                ok, failed_reason = False, f"{type(exc).__name__}: {exc}"
            else:
                failed_reason = "the channel refused or did not answer"
            if ok:
                with UnitOfWork(engine, actor="system:delivery", reason=f"delivered to channel {ch.id}", clock=clock) as u:
                    u.session.add(NotificationDelivery(outbox_id=note.id, channel=ch.id, delivered_at=u.at))
                    u.commit()
            else:
                failed.append(f"channel {ch.id}: {failed_reason}")
        if failed:
            _attempt(engine, note.id, clock, "; ".join(failed)[:MAX_ERROR])
            report.pending += 1
            report.errors.extend(failed)
        else:
            _finish(engine, note.id, OutboxStatus.DELIVERED, clock, None)
            report.delivered += 1
    return report


def _finish(engine, outbox_id: int, status: OutboxStatus, clock, error) -> None:
    with UnitOfWork(engine, actor="system:delivery", reason=f"notice {status.value}", clock=clock) as u:
        row = u.session.get(NotificationOutbox, outbox_id)
        row.status, row.attempts, row.last_error = status, row.attempts + 1, error
        row.delivered_at = u.at if status is OutboxStatus.DELIVERED else None
        u.session.add(row)
        u.commit()


def _attempt(engine, outbox_id: int, clock, error: str) -> None:
    with UnitOfWork(engine, actor="system:delivery", reason="delivery attempt failed; will retry", clock=clock) as u:
        row = u.session.get(NotificationOutbox, outbox_id)
        row.attempts, row.last_error = row.attempts + 1, error
        u.session.add(row)
        u.commit()
