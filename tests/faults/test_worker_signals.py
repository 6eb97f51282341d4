"""`nktrial up` stops everything it started, promptly, on SIGTERM and on SIGINT, also when a non-interactive
script started it in the background with `&` (the shell then starts it with SIGINT ignored, which a Prefect
worker used to inherit: it then ignored SIGINT, and the SIGTERM it turns into SIGINT).

One real start (about 30 s) for SIGTERM; SIGINT and kill -9 go through the same supervisor (nktrial/supervisor.py)
with stand-in children that ignore SIGTERM and SIGINT and leave a grandchild in a session of its own, as a
worker's flow run may be: cheaper than a second start, and harder to stop than Prefect's own processes.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from nktrial.server import free_port

ROOT = Path(__file__).parents[2]
START_TIMEOUT_S = 150
PROMPT_S = 10.0  # "within a few seconds": the supervisor gives each child 5 s, the server and the worker stop in about 2


def _marked(marker: str) -> list[int]:
    """Running processes whose environment holds `marker` (what this test started, and nothing else)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            try:
                stat = (proc / "stat").read_text()
                if marker.encode() in (proc / "environ").read_bytes().split(b"\0") and stat[stat.rindex(")") + 2] != "Z":
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _ignores_sigint(pid: int) -> bool:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("SigIgn:"))
    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def _background(command: str, cwd: Path, env: dict) -> int:
    """Start `command` with `&` from a non-interactive shell that exits at once; the background job's pid."""
    out = subprocess.run(["bash", "-c", f"{command} > out.txt 2>&1 < /dev/null & echo $!"], cwd=cwd, env=env, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip())


def _wait_for(path: Path, text: str, timeout_s: float, pid: int) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        if time.monotonic() > deadline or not Path(f"/proc/{pid}").exists():
            pytest.fail(f"no {text!r} from pid {pid}:\n{path.read_text(errors='replace') if path.exists() else '(no output)'}")
        time.sleep(0.3)


def _gone_after(signum: int, pid: int, marker: str) -> float:
    """Send `signum` to `pid`; seconds until no process of `marker` is left (fails after 30 s, killing what is left)."""
    began = time.monotonic()
    os.kill(pid, signum)
    while _marked(marker):
        if time.monotonic() - began > 30:
            left = _marked(marker)
            for p in left:
                os.kill(p, signal.SIGKILL)
            pytest.fail(f"still running 30 s after {signal.Signals(signum).name}: {left}")
        time.sleep(0.1)
    return time.monotonic() - began


def _flow_run_in_flight(data: Path, port: int, marker: str) -> int:
    """Start a daily-rounds run through the API and wait (up to 20 s) until the worker has started its process."""
    from tests.helpers import call_api

    api, auth = f"http://127.0.0.1:{port}/api", (data / "prefect-api-auth").read_text().strip()
    status, deployment = call_api(f"{api}/deployments/name/daily-rounds/daily-rounds", auth=auth)
    assert status == 200, status
    status, _ = call_api(f"{api}/deployments/{deployment['id']}/create_flow_run", body={}, auth=auth)
    assert status == 201, status
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        runs = [p for p in _marked(marker) if b"prefect.engine" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if runs:
            return len(runs)
        time.sleep(0.1)
    return 0



@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds its processes through /proc")
def test_nktrial_up_started_with_an_ampersand_stops_itself_its_server_and_its_worker_within_seconds_of_sigterm(tmp_path):
    data = tmp_path / "data"
    marker = f"NKTRIAL_DATA_DIR={data}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NKTRIAL_"))} | {"NKTRIAL_DATA_DIR": str(data)}
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"  # the worker takes the flow run below sooner (default 10 s)
    port = free_port()
    up = _background(f"exec {sys.executable} -m nktrial up --port {port}", tmp_path, env)
    try:
        # `exec` keeps the pid; the & gives it SIGINT ignored, as any script's background job
        _wait_for(tmp_path / "out.txt", "Press Ctrl-C", START_TIMEOUT_S, up)
        started = _marked(marker)
        cmds = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in started}
        assert up in started and any(" server start" in c for c in cmds.values()) and any(" worker start" in c for c in cmds.values())
        children = [pid for pid, c in cmds.items() if " start" in c]
        assert not any(_ignores_sigint(pid) for pid in children), "a child inherited the ignored SIGINT of a background job"
        in_flight = _flow_run_in_flight(data, port, marker)  # a worker stopped alone waits for its flow runs
        assert in_flight, "the worker started no flow run process within 20 s"
        took = _gone_after(signal.SIGTERM, up, marker)
        print(f"SIGTERM: nktrial up, its server, its worker and {in_flight} flow run process(es) "
              f"({len(started) + in_flight} processes) gone in {took:.1f} s")
        assert took < PROMPT_S
        assert "SIGTERM: stopping the worker and the server" in (tmp_path / "out.txt").read_text()
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
                     start_new_session=True)
    time.sleep(300)
""")
POLITE = "import time; time.sleep(300)"

SUPERVISE = textwrap.dedent("""
    import sys, time
    from nktrial.supervisor import Supervisor
    processes = Supervisor(grace_s=float(sys.argv[1]))
    processes.install_handlers()
    try:
        for code in sys.argv[2:]:
            processes.start([sys.executable, "-c", code])
        print("ready", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        print(f"stopped in {processes.stop():.1f} s", flush=True)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds its processes through /proc")
def test_the_supervisor_started_with_an_ampersand_stops_stubborn_children_and_grandchildren_on_sigint_and_on_kill_9(tmp_path):
    (tmp_path / "supervise.py").write_text(SUPERVISE)
    marker = f"NKTRIAL_SIGNAL_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), marker.split("=")[0]: marker.split("=")[1]}
    q = shlex.quote
    try:
        grace_s = 1.5
        boss = _background(f"exec {sys.executable} supervise.py {grace_s} {q(STUBBORN)} {q(STUBBORN)}", tmp_path, env)
        _wait_for(tmp_path / "out.txt", "ready", 30, boss)
        while len(_marked(marker)) < 5:  # the supervisor, two children, two grandchildren in sessions of their own
            time.sleep(0.1)
        assert _ignores_sigint(boss) is False  # it took SIGINT back from the shell that started it with &
        took = _gone_after(signal.SIGINT, boss, marker)
        print(f"SIGINT: supervisor, 2 children and 2 grandchildren that ignore SIGTERM and SIGINT gone in {took:.1f} s")
        assert took < 2 * grace_s + 2  # each child's grace, then SIGKILL
        assert "interrupted" in (tmp_path / "out.txt").read_text()

        (tmp_path / "out.txt").unlink()
        boss = _background(f"exec {sys.executable} supervise.py {grace_s} {q(POLITE)}", tmp_path, env)
        _wait_for(tmp_path / "out.txt", "ready", 30, boss)
        assert len(_marked(marker)) == 2
        took = _gone_after(signal.SIGKILL, boss, marker)  # nothing runs its stop(): the child hears of it from the kernel
        print(f"kill -9: supervisor and its child gone in {took:.1f} s")
        assert took < 2
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)
