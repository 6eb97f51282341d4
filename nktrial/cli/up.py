"""`nktrial up`: the main job — a local Prefect server, every flow deployed, a worker."""

from __future__ import annotations


def cmd_up(args) -> None:
    from nktrial.up import run
    from tasks.settings import get_settings

    settings = get_settings()
    code = run(host=args.host, port=args.port, data_dir=settings.data_dir, apprise_config=settings.apprise_config)
    if code:
        raise SystemExit(code)


def add_parsers(sub) -> None:
    up = sub.add_parser("up", help="start a local Prefect server, deploy every flow, start a worker (Ctrl-C stops)")
    up.add_argument("--host", default="127.0.0.1", help="address the server listens on (default 127.0.0.1: this machine only; "
                                                          "for other machines, a TLS proxy in front: README, Security)")
    up.add_argument("--port", type=int, default=4200)
    up.set_defaults(func=cmd_up)
