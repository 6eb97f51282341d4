"""A real HTTP endpoint for apprise's json:// notifications, on loopback: what rehearsals and tests capture."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    title: str
    body: str


@dataclass
class Receiver:
    """Collects every message posted to it; paths listed in `down` answer 503 instead."""

    messages: list[Received] = field(default_factory=list)
    down: set[str] = field(default_factory=set)
    port: int = 0

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                data = json.loads(self.rfile.read(length) or b"{}")
                path = self.path.strip("/")
                if path in receiver.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.messages.append(Received(path, data.get("title", ""), data.get("message", "")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()

    def at(self, path: str) -> list[Received]:
        return [m for m in self.messages if m.path == path]

    def apprise_yaml(self, channels: dict[str, list[str]]) -> str:
        """An apprise config: one json:// URL per path, tagged with the roles it serves."""
        lines = ["urls:"]
        for path, roles in channels.items():
            lines += [f"  - json://127.0.0.1:{self.port}/{path}:", f"      tag: {', '.join(roles)}"]
        return "\n".join(lines) + "\n"
