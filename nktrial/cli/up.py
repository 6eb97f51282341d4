"""`nktrial up`: the main job — a local Prefect server, every flow deployed, a worker. `--ha`: scaled out."""

from __future__ import annotations

import os

from protocol.errors import UserError

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def cmd_up(args) -> None:
    from tasks.settings import get_settings

    settings = get_settings()
    given = [f"--{n}" for n in ("workers", "replicas") if getattr(args, n) != 2] + \
            [f"--{n.replace('_', '-')}" for n in ("postgres_url", "redis_url") if getattr(args, n) != getattr(args, f"_{n}_default")]
    if given and not args.ha:
        raise UserError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the scaled-out stack only: add --ha")
    if args.ha:
        from nktrial.ha import HaConfig, run_ha

        cfg = HaConfig(postgres_url=args.postgres_url, redis_url=args.redis_url,
                       prefect_database_url=os.environ.get("NKTRIAL_HA_PREFECT_DATABASE_URL") or None,
                       trial_database_url=settings.database_url, workers=args.workers, replicas=args.replicas,
                       host=args.host, port=args.port)
        code = run_ha(cfg, data_dir=settings.data_dir, apprise_config=settings.apprise_config)
    else:
        from nktrial.up import run

        code = run(host=args.host, port=args.port, data_dir=settings.data_dir, apprise_config=settings.apprise_config)
    if code:
        raise SystemExit(code)


def _count(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= n <= 16:
        raise argparse.ArgumentTypeError(f"{n} is outside 1 to 16")
    return n


def add_parsers(sub) -> None:
    up = sub.add_parser("up", help="start a local Prefect server, deploy every flow, start a worker (Ctrl-C stops); "
                                    "--ha: PostgreSQL, Redis, API replicas behind HAProxy, several workers")
    up.add_argument("--host", default="127.0.0.1", help="address the server (with --ha: HAProxy) listens on (default 127.0.0.1: "
                                                          "this machine only; for other machines, a TLS proxy in front: README, Security)")
    up.add_argument("--port", type=int, default=4200)
    ha = up.add_argument_group("scaled out (--ha; README, Scaled out)")
    ha.add_argument("--ha", action="store_true", help="Prefect's scaled-out server: PostgreSQL, Redis, API replicas, services, workers")
    ha.add_argument("--workers", type=_count, default=2, help="workers on the pool (default 2)")
    ha.add_argument("--replicas", type=_count, default=2, help="API replicas behind HAProxy (default 2)")
    ha.add_argument("--postgres-url", default=os.environ.get("NKTRIAL_HA_POSTGRES_URL") or DEFAULT_POSTGRES,
                    help="PostgreSQL server and a role that may create databases: nktrial_prefect and nktrial_trial are created on it "
                         "unless NKTRIAL_HA_PREFECT_DATABASE_URL and NKTRIAL_DATABASE_URL name existing ones "
                         f"(env NKTRIAL_HA_POSTGRES_URL; default {DEFAULT_POSTGRES})")
    ha.add_argument("--redis-url", default=os.environ.get("NKTRIAL_HA_REDIS_URL") or DEFAULT_REDIS,
                    help=f"Redis for events, leases and the task queue (env NKTRIAL_HA_REDIS_URL; default {DEFAULT_REDIS})")
    up.set_defaults(func=cmd_up, _postgres_url_default=os.environ.get("NKTRIAL_HA_POSTGRES_URL") or DEFAULT_POSTGRES,
                    _redis_url_default=os.environ.get("NKTRIAL_HA_REDIS_URL") or DEFAULT_REDIS)
