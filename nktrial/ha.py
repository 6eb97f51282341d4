"""`nktrial up --ha` (`make up-ha`): the same deployments on Prefect's scaled-out server, on one or more nodes.

What it starts, in order (each in a session of its own, stopped together by Ctrl-C, SIGTERM or SIGHUP):
  1. the trial database on PostgreSQL (`nktrial db upgrade`) and Prefect's database on PostgreSQL, migrated once
     (`prefect server database upgrade`; the replicas start with PREFECT_SERVER_DATABASE_MIGRATE_ON_START=false);
  2. API replica 1 (`prefect server start --no-services`), waited for on /api/ready, then replica 2 (it registers no
     blocks: both at once on a fresh database can collide on a block type's unique slug);
  3. one `prefect server services start` (scheduler, triggers for the zombie-run automation, late runs, …);
  4. HAProxy in front of the replicas (deploy/haproxy.cfg: health checks, websocket upgrades, retry on the other
     replica), on the port the UI, the CLI and the workers use;
  5. the work pool, whose job template carries the trial's settings (nktrial/workpool.py), `prefect deploy --all`,
     `nktrial reconcile`, and N workers (default 2) on the pool.
Events, the concurrency leases (enroll-patient runs one at a time) and the task queue go through Redis
(prefect-redis, the `ha` extra). A replica, the services, HAProxy or a worker that dies is started again after
RESTART_AFTER_S, so one process lost costs the system nothing but its in-flight work, which heartbeats, the zombie
automation and the projection check repair.

It uses PostgreSQL and Redis by URL, so the same command works against a site's managed ones.
"""

from __future__ import annotations

import os
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from nktrial.apiauth import LOOPBACK, load_or_create, private_dir, secret_path
from nktrial.server import free_port, healthy, prefect_exe
from nktrial.supervisor import Supervisor
from nktrial.up import POOL, ROOT, _step, addresses, stack_env, tighten
from protocol.errors import UserError

HAPROXY_TEMPLATE = ROOT / "deploy" / "haproxy.cfg"
RESTART_AFTER_S = 2.0  # a process that died is started again after this pause, doubled for each death in the last
RESTART_MAX_S = 60.0  # RESTART_WINDOW_S up to this (a database fail-over can take a minute): never given up on
RESTART_WINDOW_S = 600.0
REDIS_SETTINGS = {  # prefect-redis: one Redis database serves all of them (DESIGN.md, tried on this machine kind)
    "PREFECT_SERVER_EVENTS_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
    "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
    # A replica passes each event on to Redis as it arrives. prefect-redis's default holds up to 4 events for up to 10 s
    # in the replica's memory: a replica killed then loses them, and a lost heartbeat is a dead run the zombie
    # automation never hears of (never marked Crashed, its enrollment slot held until the lease runs out, 5 min).
    "PREFECT_REDIS_MESSAGING_PUBLISHER_BATCH_SIZE": "1",
}


@dataclass
class HaConfig:
    postgres_url: str  # a server and a role that may create databases; the two databases default to names on it
    redis_url: str
    prefect_database_url: str | None = None  # Prefect's own database (postgresql+asyncpg://…); created when unset
    trial_database_url: str | None = None  # the trial database (NKTRIAL_DATABASE_URL); created when unset
    workers: int = 2
    replicas: int = 2
    host: str = "127.0.0.1"
    port: int = 4200


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    start_at: float | None = None  # dead, to be started again at this time (monotonic)


def _database_url(base: str, name: str, driver: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(base).set(drivername=f"postgresql+{driver}", database=name).render_as_string(hide_password=False)


def ensure_database(admin_url: str, url: str) -> bool:
    """Create the database `url` names on the server of `admin_url` if it is missing; True if created."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    admin = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return False
            conn.execute(f'CREATE DATABASE "{name}"')
            return True
    except psycopg.Error as exc:
        raise UserError(f"PostgreSQL at {make_url(admin_url).render_as_string()}: {str(exc).strip().splitlines()[0]} "
                        "(--postgres-url must name a server and a role that may create databases, or give both database URLs)") from None


def check_redis(url: str) -> None:
    try:
        import redis
    except ImportError:
        raise UserError("Redis support is not installed: pip install -e '.[ha]' (make up-ha does it)") from None
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except (redis.RedisError, ValueError) as exc:
        raise UserError(f"--redis-url {_shown(url)}: {exc}") from None


def ready(api: str) -> bool:
    """The replica answers /api/ready (its database reachable), which needs no auth."""
    try:
        with urllib.request.urlopen(f"{api}/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def haproxy_config(bind_host: str, bind_port: int, replica_ports: list[int]) -> str:
    servers = "\n".join(f"    server replica{i} 127.0.0.1:{p} check" for i, p in enumerate(replica_ports, 1))
    return string.Template(HAPROXY_TEMPLATE.read_text(encoding="utf-8")).substitute(
        bind_host=bind_host, bind_port=bind_port, servers=servers)


class HaSupervisor(Supervisor):
    """The Supervisor of `nktrial up`, which also starts a child again when it dies."""

    def __init__(self) -> None:
        super().__init__()
        self.named: list[Child] = []

    def launch(self, child: Child) -> Child:
        old = child.proc
        with open(child.log, "a", encoding="utf-8") as log:
            child.proc = self.start(child.args, env=child.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if old is not None:  # in the dead one's place, so that stopping keeps its order (workers before the servers)
            self.children.remove(child.proc)
            self.children[self.children.index(old)] = child.proc
        if child not in self.named:
            self.named.append(child)
        return child

    def watch_once(self) -> None:
        """Start again every child that has died, after a pause that grows while it keeps dying (never given up on:
        the rest of the stack goes on serving meanwhile)."""
        now = time.monotonic()
        for child in self.named:
            if child.start_at is None:
                code = child.proc.poll()
                if code is None:
                    continue
                self._stop_one(child.proc)  # whatever it left (a dead worker's flow runs) goes with it, first
                child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
                pause = min(RESTART_MAX_S, RESTART_AFTER_S * 2 ** (len(child.restarts) - 1))
                child.start_at = time.monotonic() + pause
                often = f" ({len(child.restarts)} times in {RESTART_WINDOW_S / 60:.0f} min: see {child.log})" if len(child.restarts) > 2 else ""
                print(f"! {child.name} stopped (exit {code}){often}; starting it again in {pause:.0f} s", flush=True)
            elif now >= child.start_at and not self.signalled:
                child.start_at = None
                self.launch(child)
                print(f"• {child.name} started again (pid {child.proc.pid})", flush=True)


def run_ha(cfg: HaConfig, *, data_dir: Path, apprise_config: Path | None) -> int:
    data_dir = private_dir(data_dir.resolve())
    old_umask = os.umask(0o077)
    try:
        return _run_ha(cfg, data_dir=data_dir, apprise_config=apprise_config)
    finally:
        os.umask(old_umask)


def _run_ha(cfg: HaConfig, *, data_dir: Path, apprise_config: Path | None) -> int:
    import shutil

    tighten(data_dir)
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if cfg.workers < 1 or cfg.replicas < 1:
        raise UserError("--workers and --replicas must each be at least 1")
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise UserError("haproxy is not installed: it balances the API replicas (Debian: apt-get install haproxy; "
                        "make up-ha installs it when run as root)")
    check_redis(cfg.redis_url)
    if cfg.trial_database_url and not cfg.trial_database_url.startswith("postgresql"):
        raise UserError("NKTRIAL_DATABASE_URL must name a PostgreSQL database with --ha: every node writes the one trial record")
    if not (cfg.prefect_database_url and cfg.trial_database_url) and _has_password(cfg.postgres_url):
        raise UserError("--postgres-url carries a password: name the two databases instead (NKTRIAL_HA_PREFECT_DATABASE_URL and "
                        "NKTRIAL_DATABASE_URL, each with its own role), so that the creating role's password reaches no flow run")
    prefect_db = cfg.prefect_database_url or _database_url(cfg.postgres_url, "nktrial_prefect", "asyncpg")
    trial_db = cfg.trial_database_url or _database_url(cfg.postgres_url, "nktrial_trial", "psycopg")
    created = [url for url, given in ((prefect_db, cfg.prefect_database_url), (trial_db, cfg.trial_database_url))
               if not given and ensure_database(cfg.postgres_url, url)]

    api, ui = addresses(cfg.host, cfg.port)
    if healthy(api):
        raise UserError(f"port {cfg.port}: a Prefect server already answers at {ui}; stop it first or choose --port")
    auth, first_start = load_or_create(data_dir)
    env = {
        **stack_env(data_dir=data_dir, api=api, ui=ui, auth=auth, prefect_home="prefect-ha"),
        "NKTRIAL_DATABASE_URL": trial_db,
        # reports and exports in one folder every worker sees (on several nodes: a shared mount)
        "NKTRIAL_REPORTS_DIR": os.environ.get("NKTRIAL_REPORTS_DIR") or str(data_dir / "reports"),
    }
    if apprise_config:
        env["NKTRIAL_APPRISE_CONFIG"] = str(apprise_config.resolve())
    server_env = {
        **env,
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_db,
        "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",
        "PREFECT_SERVER_DOCKET_URL": cfg.redis_url,
        "PREFECT_REDIS_MESSAGING_URL": cfg.redis_url,
        **REDIS_SETTINGS,
    }
    procs = HaSupervisor()
    procs.install_handlers()
    try:
        _step(f"API authentication: the basic-auth string in {secret_path(data_dir)}"
              + (" (new; the UI asks for it once per browser)" if first_start else ""))
        if cfg.host not in LOOPBACK:
            _step(f"listening on {cfg.host}: other machines reach the API over plain http; "
                  "put it behind the site's TLS reverse proxy (README, Security)")
        for url in created:
            _step(f"created the database {url.rsplit('/', 1)[-1]} on PostgreSQL")
        _step("trial database: PostgreSQL (nktrial db upgrade)")
        _checked([sys.executable, "-m", "nktrial", "db", "upgrade"], env, logs / "db-upgrade.log", "the trial database upgrade")
        _step("Prefect's database: PostgreSQL (migrated once, here)")
        _checked([prefect_exe(), "server", "database", "upgrade", "-y"], server_env, logs / "prefect-db-upgrade.log",
                 "Prefect's database upgrade")
        replica_ports = [free_port() for _ in range(cfg.replicas)]
        for i, port in enumerate(replica_ports, 1):
            replica_env = {**server_env, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
            if i > 1:
                replica_env["PREFECT_SERVER_REGISTER_BLOCKS_ON_START"] = "false"
            _step(f"API replica {i} on 127.0.0.1:{port} (log: {logs / f'replica-{i}.log'})")
            child = procs.launch(Child(f"API replica {i}", [prefect_exe(), "server", "start", "--no-services", "--host", "127.0.0.1",
                                                          "--port", str(port)], replica_env, logs / f"replica-{i}.log"))
            _wait(lambda p=port: ready(f"http://127.0.0.1:{p}/api"), child, 180, f"API replica {i}")
        _step(f"Prefect's services (scheduler, automations, late runs) (log: {logs / 'services.log'})")
        procs.launch(Child("the services", [prefect_exe(), "server", "services", "start"], server_env, logs / "services.log"))
        cfg_path = data_dir / "haproxy.cfg"
        cfg_path.write_text(haproxy_config(cfg.host, cfg.port, replica_ports), encoding="utf-8")
        _step(f"HAProxy on {ui} in front of {cfg.replicas} replicas (config: {cfg_path}, log: {logs / 'haproxy.log'})")
        lb = procs.launch(Child("HAProxy", [haproxy, "-db", "-f", str(cfg_path)], env, logs / "haproxy.log"))
        _wait(lambda: healthy(api), lb, 30, "HAProxy")
        _step(f"work pool '{POOL}': every flow run gets the trial's database, channels and UI address")
        _checked([sys.executable, "-m", "nktrial.workpool", POOL], env, logs / "workpool.log", "the work pool")
        _step("deploying every flow from prefect.yaml")
        _checked([prefect_exe(), "--no-prompt", "deploy", "--all"], env, logs / "deploy.log", "prefect deploy")
        _step("reconciling every patient's scheduled runs with the trial database")
        rec = subprocess.run([sys.executable, "-m", "nktrial", "reconcile"], check=False, env=env, capture_output=True, text=True, cwd=ROOT)
        (logs / "reconcile.log").write_text(rec.stdout + rec.stderr, encoding="utf-8")
        if rec.returncode != 0:
            print(f"warning: reconcile did not finish (see {logs / 'reconcile.log'}); daily rounds repair the runs at 07:00", flush=True)
        for i in range(1, cfg.workers + 1):
            _step(f"worker {i} on pool '{POOL}' (log: {logs / f'worker-{i}.log'})")
            procs.launch(Child(f"worker {i}", [prefect_exe(), "worker", "start", "--pool", POOL, "--name", f"nktrial-worker-{i}"],
                               env, logs / f"worker-{i}.log"))
        print(f"""
NCT06641648 orchestrator is up, scaled out: {cfg.replicas} API replicas behind HAProxy, the services, {cfg.workers} workers.

  Prefect UI   {ui}  (asks for the string in {secret_path(data_dir)})
  CLI          export PREFECT_API_URL={api} NKTRIAL_DATABASE_URL='{_shown(trial_db)}'
  databases    Prefect and the trial on PostgreSQL; events and leases on Redis {_shown(cfg.redis_url)}
  reports      {env['NKTRIAL_REPORTS_DIR']}
  pids         {', '.join(f'{c.name} {c.proc.pid}' for c in procs.named)}

A process that stops is started again within seconds. Press Ctrl-C to stop everything.
""", flush=True)
        while True:
            procs.watch_once()
            time.sleep(0.5)
    except KeyboardInterrupt:
        procs.signalled = procs.signalled or signal.SIGINT
        print(f"\n{signal.Signals(procs.signalled).name}: stopping the workers, HAProxy, the services and the replicas…", flush=True)
        return 0
    finally:
        took = procs.stop()
        print(f"stopped; the data is kept in PostgreSQL and {data_dir} (stopping took {took:.1f} s)", flush=True)


def _shown(url: str) -> str:
    """A database or Redis URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[1]))


def _has_password(url: str) -> bool:
    from urllib.parse import urlsplit

    return bool(urlsplit(url).password)


def _checked(args: list[str], env: dict[str, str], log: Path, what: str) -> None:
    done = subprocess.run(args, check=False, env=env, capture_output=True, text=True, cwd=ROOT)
    log.write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        raise UserError(f"{what} failed; see {log}")


def _wait(ok, child: Child, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if child.proc.poll() is not None or time.monotonic() > deadline:
            raise UserError(f"{what} did not start; see {child.log}")
        time.sleep(0.5)


class UpInBackground:
    """`nktrial up` (with `--ha` or not) started as a process of its own, for a test or a benchmark: waited for until its
    summary is printed, and stopped as an operator would stop it (SIGINT)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen | None = None

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def start(self, *, ready: str, timeout_s: float = 300) -> str:
        """Start, and wait until a line of the output starts with `ready`; that line."""
        with open(self.log, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "nktrial", "up", *self.args], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            line = next((ln.strip() for ln in self.text().splitlines() if ln.strip().startswith(ready)), None)
            if line:
                return line
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nktrial up {' '.join(self.args)} did not come up: {self.text()[-3000:]}")
            time.sleep(0.5)

    def pids(self) -> dict[str, int]:
        """The processes of `nktrial up --ha` by name ("API replica 1", "worker 2", "HAProxy", …), restarts included."""
        import re

        text = self.text()
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("pids "))
        found = {name: int(pid) for name, pid in re.findall(r"([A-Za-z][A-Za-z ]*?\d?) (\d+)(?:,|$)", line.split("pids", 1)[1].strip())}
        found.update({name: int(pid) for name, pid in re.findall(r"• (.+?) started again \(pid (\d+)\)", text)})
        return found

    def stop(self) -> float:
        began = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return time.monotonic() - began
