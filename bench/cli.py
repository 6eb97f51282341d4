"""Benchmark: pure CLI commands as whole processes, against a bare interpreter start.

A pure command (no database, no Prefect server) is what a coordinator types most: `nktrial
escalation next`, `nktrial calendar`, `nktrial screen`, `nktrial protocol show`. Each is timed as a
whole process, N times, and printed as a median with its ratio to `python -c pass` and to
`python -c "import pydantic"` (the floor of any command that reads the protocol file with its
typed model), measured in the same run. Not a test: nothing here asserts.

    .venv/bin/python bench/cli.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NKTRIAL = [sys.executable, "-m", "nktrial"]
COMMANDS = {
    "escalation next": [*NKTRIAL, "escalation", "next", "1NNN 2NTN"],
    "calendar": [*NKTRIAL, "calendar", "--dose-level", "1", "--day0", "2027-01-31T09:00"],
    "screen": [*NKTRIAL, "screen", str(ROOT / "examples" / "screening-S-001.json"), "--day0", "2027-01-31"],
    "protocol show": [*NKTRIAL, "protocol", "show"],
}


def timed(argv: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    bare = timed([sys.executable, "-c", "pass"], args.repeat)
    pyd = timed([sys.executable, "-c", "import pydantic, yaml"], args.repeat)
    print(f"baseline python -c pass: {bare * 1000:.0f} ms; python -c 'import pydantic, yaml': {pyd * 1000:.0f} ms "
          f"(medians of {args.repeat})")
    for name, argv in COMMANDS.items():
        m = timed(argv, args.repeat)
        print(f"  nktrial {name:<16} {m * 1000:6.0f} ms   {m / bare:5.1f} × python -c pass   {m / pyd:4.1f} × import pydantic, yaml")


if __name__ == "__main__":
    main()
