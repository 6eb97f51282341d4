"""A real HTTP endpoint for apprise's json:// notifications, on loopback: what rehearsals and tests capture."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    title: str
    body: str


@dataclass
class Receiver:
    """Collects every message posted to it; paths listed in `down` answer 503 instead. For fault tests: a path in
    `slow` takes the message and answers after that many seconds; a path in `hang` holds the request, takes nothing,
    and answers 503 only when `release()` is called (each held request is counted in `hung`)."""

    messages: list[Received] = field(default_factory=list)
    down: set[str] = field(default_factory=set)
    slow: dict[str, float] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    hung: list[str] = field(default_factory=list)
    port: int = 0
    _released: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                data = json.loads(self.rfile.read(length) or b"{}")
                path = self.path.strip("/")
                held = path in receiver.hang
                if held:
                    receiver.hung.append(path)
                    receiver._released.wait(timeout=120)
                if held or path in receiver.down:
                    self._answer(503)
                    return
                receiver.messages.append(Received(path, data.get("title", ""), data.get("message", "")))
                if delay := receiver.slow.get(path):
                    time.sleep(delay)
                self._answer(200)

            def _answer(self, status: int) -> None:
                try:
                    self.send_response(status)
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up (or was killed) while the request was held

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()

    def release(self) -> None:
        """Let every held request answer (503) and hold none from now on."""
        self.hang.clear()
        self._released.set()
        self._released = threading.Event()

    def at(self, path: str) -> list[Received]:
        return [m for m in self.messages if m.path == path]

    def apprise_yaml(self, channels: dict[str, list[str]]) -> str:
        """An apprise config: one json:// URL per path, tagged with the roles it serves."""
        lines = ["urls:"]
        for path, roles in channels.items():
            lines += [f"  - json://127.0.0.1:{self.port}/{path}:", f"      tag: {', '.join(roles)}"]
        return "\n".join(lines) + "\n"
