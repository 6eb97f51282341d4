"""The outbox under faults, on SQLite and PostgreSQL, with real apprise and the real local receiver:
concurrent delivery passes in separate processes, a pass killed while it holds claims, a missing or
broken apprise config, and a role with no channel. Nothing lost, nothing sent twice per channel."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import Session, select

from models.clock import wall_clock
from models.db import UnitOfWork
from models.tables import AuditLog, NotificationDelivery, NotificationOutbox, OutboxStatus
from protocol.roles import Role
from tasks.delivery import ChannelConfigError, deliver_pending, load_channels, require_channels
from tasks.notices import Notice, NoticeEvent, enqueue

ROOT = Path(__file__).parents[2]
NOTICE_ID = re.compile(r" · notice (\d+)$")


def nktrial(*args: str, env: dict, wait: bool = True):
    script = Path(sys.executable).with_name("nktrial")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "nktrial"]
    full_env = {**os.environ, "PREFECT_API_URL": "", **env}
    if not wait:
        return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)
    return subprocess.run([*cmd, *args], check=False, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120)


def add_notices(engine, roles: list[Role]) -> list[int]:
    """One outbox notice per role given, in that order; returns their IDs."""
    rows = []
    with UnitOfWork(engine, actor="system:test", reason="notices for a fault test") as u:
        for i, role in enumerate(roles):
            rows.append(enqueue(u.session, Notice(role, NoticeEvent.IL2_DUE, f"S-{900 + i % 100:03d}", due_on=dt.date(2027, 2, 1),
                                                  detail=f"IL-2 dose {i + 1}"), dedup=f"fault-{uuid.uuid4().hex}", at=u.at))
        u.commit()
    return [r.id for r in rows]


def config(receiver, tmp_path: Path, channels: dict[str, list[str]]) -> Path:
    """An apprise config on the receiver: one json:// URL per path (unique to this test), tagged with roles."""
    cfg = tmp_path / f"apprise-{uuid.uuid4().hex[:6]}.yml"
    cfg.write_text(receiver.apprise_yaml(channels), encoding="utf-8")
    return cfg


def received(receiver, paths) -> Counter:
    """(path, notice ID) -> how many times that channel received that notice."""
    return Counter((m.path, int(NOTICE_ID.search(m.body).group(1))) for m in receiver.messages if m.path in paths)


def statuses(engine) -> dict[int, OutboxStatus]:
    with Session(engine) as s:
        return {r.id: r.status for r in s.exec(select(NotificationOutbox))}


def env_for(db_url: str, cfg: Path | None, **extra: str) -> dict:
    return {"NKTRIAL_DATABASE_URL": db_url, "NKTRIAL_APPRISE_CONFIG": str(cfg) if cfg else "", **extra}


def test_concurrent_delivery_passes_in_separate_processes_send_each_notice_once_per_channel(engine, db_url, receiver, tmp_path):
    tag = uuid.uuid4().hex[:6]
    paths = {f"{tag}-nurse-a": ["nurse"], f"{tag}-nurse-b": ["nurse"], f"{tag}-coord": ["coordinator"]}
    cfg = config(receiver, tmp_path, paths)
    ids = add_notices(engine, [Role.NURSE, Role.COORDINATOR] * 12)
    for p in paths:
        receiver.slow[p] = 0.02  # each send takes a moment, so the passes overlap
    try:
        procs = [nktrial("notify", "deliver", env=env_for(db_url, cfg), wait=False) for _ in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in paths:
            receiver.slow.pop(p, None)
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    assert not any("Traceback" in err or "Error" in err for _, err in outs), [err for _, err in outs]
    got = received(receiver, paths)
    wanted = {(p, i) for i in ids[0::2] for p in (f"{tag}-nurse-a", f"{tag}-nurse-b")} | {(f"{tag}-coord", i) for i in ids[1::2]}
    assert set(got) == wanted and set(got.values()) == {1}, {k: n for k, n in got.items() if n != 1}
    assert set(statuses(engine).values()) == {OutboxStatus.DELIVERED}
    with Session(engine) as s:
        assert len(s.exec(select(NotificationDelivery)).all()) == len(wanted)
        assert not [r for r in s.exec(select(NotificationOutbox)) if r.claimed_by or r.claim_expires_at]


def test_concurrent_passes_in_one_process_send_each_notice_once(engine, receiver, tmp_path):
    """Two flow runs in one worker deliver at once: threads, one engine."""
    import threading

    tag = uuid.uuid4().hex[:6]
    cfg = config(receiver, tmp_path, {f"{tag}-pi": ["pi"]})
    ids = add_notices(engine, [Role.PI] * 15)
    channels = load_channels(cfg)
    errors = []

    def one_pass():
        try:
            deliver_pending(engine, channels, clock=wall_clock)
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            errors.append(repr(exc))

    threads = [threading.Thread(target=one_pass) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert received(receiver, {f"{tag}-pi"}) == Counter({(f"{tag}-pi", i): 1 for i in ids})


def test_a_pass_killed_while_holding_claims_is_taken_over_after_its_lease_without_a_duplicate(engine, db_url, receiver, tmp_path):
    tag = uuid.uuid4().hex[:6]
    nurse, coord = f"{tag}-nurse", f"{tag}-coord"
    cfg = config(receiver, tmp_path, {nurse: ["nurse"], coord: ["coordinator"]})
    ids = add_notices(engine, [Role.NURSE, Role.COORDINATOR] * 3)  # the first coordinator notice hangs
    lease = 4
    receiver.hang.add(coord)
    start = len(receiver.hung)
    try:
        proc = nktrial("notify", "deliver", env=env_for(db_url, cfg, NKTRIAL_DELIVERY_LEASE_SECONDS=str(lease)), wait=False)
        deadline = time.monotonic() + 60
        while len(receiver.hung) == start and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(receiver.hung) > start, proc.communicate()[1] if proc.poll() is not None else "the pass never reached the hung channel"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert received(receiver, {nurse, coord}) == Counter({(nurse, ids[0]): 1})  # sent and recorded before the hang
        # Within the lease the dead pass still holds the other five: a new pass sends none of them.
        before = statuses(engine)
        report = deliver_pending(engine, load_channels(cfg), clock=wall_clock, lease_seconds=lease)
        assert report.delivered == 0 and statuses(engine) == before
        assert received(receiver, {nurse, coord}) == Counter({(nurse, ids[0]): 1})
    finally:
        receiver.release()
    with Session(engine) as s:
        held = [r for r in s.exec(select(NotificationOutbox)) if r.claimed_by]
        assert len(held) == 5 and all(r.claim_expires_at is not None for r in held)
        time.sleep(max(0.0, (max(r.claim_expires_at for r in held) - wall_clock()).total_seconds()) + 0.2)
    after = nktrial("notify", "deliver", env=env_for(db_url, cfg))
    assert after.returncode == 0 and "Traceback" not in after.stderr, after.stderr
    assert received(receiver, {nurse, coord}) == Counter({(nurse, i): 1 for i in ids[0::2]} | {(coord, i): 1 for i in ids[1::2]})
    assert set(statuses(engine).values()) == {OutboxStatus.DELIVERED}
    with Session(engine) as s:  # every claim, delivery and release left audit rows
        audited = {r.entity_id for r in s.exec(select(AuditLog).where(AuditLog.entity == "notification_outbox",
                                                                      AuditLog.field == "claimed_by"))}
    assert audited >= {str(i) for i in ids}


BAD_CONFIGS = [
    pytest.param(None, "NKTRIAL_APPRISE_CONFIG is not set", id="unset"),
    pytest.param("", "the file is empty", id="empty"),
    pytest.param("missing", "the file does not exist", id="missing"),
    pytest.param("urls:\n  - json://127.0.0.1:9/{p}:\n      tag: nurse\n  - jsn://127.0.0.1:9/{p}-x:\n      tag: pi\n",
                 "line 4: the jsn:// URL does not load in apprise", id="unknown-scheme-yaml"),
    pytest.param("urls:\n  - json://127.0.0.1:9/{p}:\n      tag: nurse\n   - json://127.0.0.1:9/{p}-x:\n      tag: pi\n",
                 "line 4 is not valid YAML", id="bad-indent-yaml"),
    pytest.param("nurse=json://127.0.0.1:9/{p}\nthis line is not a URL\n", "line 2 is not an apprise URL", id="bad-line-text"),
]


@pytest.mark.parametrize(("content", "sentence"), BAD_CONFIGS)
def test_a_missing_empty_or_malformed_config_is_one_sentence_naming_the_line(content, sentence, tmp_path):
    bad: Path | None = None
    if content is not None:
        bad = tmp_path / "broken.yml"
        if content != "missing":
            bad.write_text(content.format(p="x"), encoding="utf-8")
    with pytest.raises(ChannelConfigError, match=re.escape(sentence)) as caught:
        require_channels(bad)
    assert "\n" not in str(caught.value) and "127.0.0.1" not in str(caught.value)  # one sentence; never the URL itself


def test_notify_deliver_with_a_missing_or_broken_config_exits_2_consumes_no_notice_and_a_fixed_config_delivers_them_all(
        engine, db_url, receiver, tmp_path):
    tag = uuid.uuid4().hex[:6]
    ids = add_notices(engine, [Role.NURSE, Role.PI])
    bad = tmp_path / "broken.yml"
    bad.write_text(f"urls:\n  - json://127.0.0.1:9/{tag}:\n      tag: nurse\n  - jsn://127.0.0.1:9/{tag}-x:\n      tag: pi\n")
    for cfg, sentence in [(None, "NKTRIAL_APPRISE_CONFIG is not set"), (bad, "line 4: the jsn:// URL does not load in apprise")]:
        out = nktrial("notify", "deliver", env=env_for(db_url, cfg))
        assert out.returncode == 2 and out.stderr.startswith("nktrial: error: NKTRIAL_APPRISE_CONFIG"), out.stderr
        assert sentence in out.stderr and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert set(statuses(engine).values()) == {OutboxStatus.PENDING}
    listed = nktrial("notify", "list", env=env_for(db_url, bad))
    assert listed.returncode == 0 and "notices waiting 2" in listed.stdout and "the apprise config cannot be used" in listed.stdout
    good = config(receiver, tmp_path, {f"{tag}-nurse": ["nurse"], f"{tag}-pi": ["pi"]})
    fixed = nktrial("notify", "deliver", env=env_for(db_url, good))
    assert fixed.returncode == 0 and fixed.stdout.startswith("2 delivered"), fixed.stderr
    assert received(receiver, {f"{tag}-nurse", f"{tag}-pi"}) == Counter({(f"{tag}-nurse", ids[0]): 1, (f"{tag}-pi", ids[1]): 1})


def test_a_cli_write_with_a_broken_config_is_recorded_and_warns_that_notices_wait(receiver, tmp_path):
    from models.db import make_engine
    from models.migrate import upgrade
    from tests.helpers import register_staff

    db = tmp_path / "data" / "trial.db"
    env = {"NKTRIAL_DATA_DIR": str(db.parent), "NKTRIAL_DATABASE_URL": "", "NKTRIAL_ACTOR": "coord-1"}
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    register_staff(engine)
    broken = tmp_path / "apprise.txt"
    broken.write_text("coordinator=json://127.0.0.1:9/x\ncell-lab=nope://\n", encoding="utf-8")
    out = nktrial("enroll", str(ROOT / "examples" / "screening-S-001.json"), "--day0", "2099-01-31T09:00",
                  env={**env, "NKTRIAL_APPRISE_CONFIG": str(broken)})
    assert out.returncode == 0, out.stderr
    assert "S-001 enrolled" in out.stdout and "Traceback" not in out.stderr
    assert "warning: NKTRIAL_APPRISE_CONFIG" in out.stderr and "line 2" in out.stderr and "wait in the outbox" in out.stderr
    assert set(statuses(engine).values()) == {OutboxStatus.PENDING} and len(statuses(engine)) >= 1
    engine.dispose()


def test_a_role_without_a_channel_stays_pending_shows_in_notify_list_and_goes_once_a_channel_exists(engine, db_url, receiver, tmp_path):
    tag = uuid.uuid4().hex[:6]
    nurse, lab = f"{tag}-nurse", f"{tag}-lab"
    ids = add_notices(engine, [Role.NURSE, Role.CELL_LAB, Role.CELL_LAB])
    only_nurse = config(receiver, tmp_path, {nurse: ["nurse"]})
    first = nktrial("notify", "deliver", env=env_for(db_url, only_nurse))
    assert first.returncode == 0 and "1 delivered" in first.stdout and "2 waiting: no channel serves cell-lab" in first.stdout
    assert statuses(engine) == {ids[0]: OutboxStatus.DELIVERED, ids[1]: OutboxStatus.PENDING, ids[2]: OutboxStatus.PENDING}
    listed = nktrial("notify", "list", env=env_for(db_url, only_nurse))
    assert "notices waiting 2, oldest " in listed.stdout and "(cell-lab 2)" in listed.stdout
    assert len(re.findall(r"cell-lab +pending +\d+ min +no channel serves cell-lab", listed.stdout)) == 2, listed.stdout
    both = config(receiver, tmp_path, {nurse: ["nurse"], lab: ["cell-lab"]})
    for _ in range(2):  # a second pass sends nothing again
        deliver_pending(engine, load_channels(both), clock=wall_clock)
    assert received(receiver, {nurse, lab}) == Counter({(nurse, ids[0]): 1, (lab, ids[1]): 1, (lab, ids[2]): 1})
    assert set(statuses(engine).values()) == {OutboxStatus.DELIVERED}


def test_the_migration_sets_notices_marked_no_channel_back_to_pending_with_an_audit_row(owner_url):
    from models.audit_chain import GENESIS, row_hash
    from models.db import make_engine
    from models.migrate import downgrade, upgrade

    engine = make_engine(owner_url)
    upgrade(engine)
    downgrade(engine, "0006")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO notification_outbox (dedup_key, role, event, title, body, status, attempts, created_at) "
                             "VALUES ('old', 'nurse', 'il2_due', 't', 'S-001 · IL-2 dose due today', 'no_channel', 1, "
                             "'2027-01-01 00:00:00')")
    upgrade(engine)
    with Session(engine) as s:
        (row,) = s.exec(select(NotificationOutbox)).all()
        audit = s.exec(select(AuditLog).order_by(AuditLog.id)).all()
    engine.dispose()
    assert row.status is OutboxStatus.PENDING and row.claimed_by is None
    assert (audit[-1].entity, audit[-1].entity_id, audit[-1].old_value, audit[-1].new_value) == (
        "notification_outbox", str(row.id), "no_channel", "pending")
    prev = GENESIS
    for a in audit:  # the chain still verifies
        assert a.prev_hash == prev and a.row_hash == row_hash(a.model_dump(), prev)
        prev = a.row_hash


def test_the_daily_digest_says_how_many_notices_wait_for_how_long_and_for_which_roles(engine, protocol):
    from tasks.rounds import daily_rounds

    add_notices(engine, [Role.CELL_LAB, Role.CELL_LAB, Role.NURSE])
    later = wall_clock() + dt.timedelta(days=2, hours=3, minutes=1)
    report = daily_rounds(engine, protocol, clock=lambda: later)
    assert report.digest.endswith("; notices waiting 3, oldest 2 d 3 h (cell-lab 2, nurse 1)"), report.digest
    with Session(engine) as s:
        (digest,) = s.exec(select(NotificationOutbox).where(NotificationOutbox.event == "daily_digest")).all()
    assert "notices waiting 3, oldest 2 d 3 h (cell-lab 2, nurse 1)" in digest.body
