"""The processes `nktrial up` starts, and how they stop: promptly, however `nktrial up` itself was started.

- `nktrial up` stops on SIGINT (Ctrl-C), SIGTERM and SIGHUP, also when a non-interactive script started it
  with `&` (the shell then starts it with SIGINT ignored; the handlers here replace that).
- Each child runs in a session, so a process group, of its own: a terminal's Ctrl-C reaches `nktrial up` only,
  and `nktrial up` stops its children in order. A child starts with the default handling of every stop signal
  (an ignored SIGINT is not passed on: a Prefect worker that inherits one ignores SIGINT, and the SIGTERM it turns
  into SIGINT) and, on Linux, gets SIGTERM if `nktrial up` dies without stopping it (kill -9).
- Stopping goes newest child first (the worker before the server, so a flow run can still report how it ended):
  SIGTERM to the child and to every process of its session or below it (a worker's flow runs, which a worker
  stopped alone waits for), then SIGKILL to whatever is left after a short grace period. A second signal
  while stopping kills at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 5.0  # how long each child (and its flow runs) may take to stop by itself before it is killed
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def _process_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, session id), from /proc (Linux); empty where there is none."""
    table = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command)": state ppid pgrp session ...
        table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[3]))
    return table


def tree(leader: int, *, with_leader: bool = True) -> set[int]:
    """The live processes of the session `leader` started, and every process below any of them (Linux; else empty).
    `with_leader` False once the leader is reaped, so that a new process given its number is never taken for it."""
    table = _process_table()
    found = {pid for pid, (state, _, sid) in table.items()
             if state != "Z" and ((sid == leader and pid != leader) or (with_leader and pid == leader))}
    grew = True
    while grew:
        below = {pid for pid, (state, ppid, _) in table.items() if ppid in found and pid not in found and state != "Z"}
        found |= below
        grew = bool(below)
    return found


def _send(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _child_setup(parent: int):
    """Run in the child between fork and exec: default stop signals, and SIGTERM when the parent dies (Linux)."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            libc = None

    def setup() -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl: nobody will send it
                os.kill(os.getpid(), signal.SIGTERM)

    return setup


class Supervisor:
    """Starts children in sessions of their own; `stop()` ends them all, each within GRACE_S."""

    def __init__(self, *, grace_s: float = GRACE_S):
        self.grace_s = grace_s
        self.children: list[subprocess.Popen] = []
        self.signalled: int | None = None  # the first stop signal received
        self.hurry = False  # a second one: kill at once

    def install_handlers(self) -> None:
        """The first stop signal raises KeyboardInterrupt in the main thread; a later one makes stop() kill at once."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.signalled is not None:
            self.hurry = True
            return
        self.signalled = signum
        raise KeyboardInterrupt

    def start(self, args: list[str], **popen) -> subprocess.Popen:
        # nktrial up starts no thread: a preexec_fn is safe here
        proc = subprocess.Popen(args, start_new_session=True, preexec_fn=_child_setup(os.getpid()), **popen)  # noqa: PLW1509
        self.children.append(proc)
        return proc

    def stop(self) -> float:
        """Stop every child, newest first; returns the seconds it took."""
        if self.signalled is None:
            self.signalled = 0  # stopping: a signal from now on hurries, never interrupts
        began = time.monotonic()
        for proc in reversed(self.children):
            self._stop_one(proc)
        return time.monotonic() - began

    def _stop_one(self, proc: subprocess.Popen) -> None:
        def left() -> set[int]:
            running = proc.poll() is None  # polling also reaps it, so it does not stay a zombie
            return {pid for pid in pids | tree(proc.pid, with_leader=running) if _alive(pid)}

        pids = tree(proc.pid, with_leader=proc.poll() is None)
        self._signal(proc, pids, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while not self.hurry and time.monotonic() < deadline:
            if not left() and proc.poll() is not None:
                return
            time.sleep(0.1)
        self._signal(proc, left(), signal.SIGKILL)
        try:
            proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            pass

    @staticmethod
    def _signal(proc: subprocess.Popen, pids: set[int], signum: int) -> None:
        """Each process once (a Prefect worker takes a second SIGTERM for SIGKILL); without /proc, the child's group."""
        if pids:
            _send(pids, signum)
        elif proc.poll() is None:
            try:
                os.killpg(proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped), by /proc."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"
