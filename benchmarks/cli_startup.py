"""Start-up cost of the command line: ``framepool --help`` and a usage error vs ``import torch``.

Each command runs in a fresh interpreter ``--repeats`` times; the table gives the best and the
median wall seconds, the CPU seconds (user + system) of the best run, and peak RSS. The goal is
``framepool --help`` under a third of ``python -c "import torch"``. Example::

    python benchmarks/cli_startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one run of ``argv`` in a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 2):
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}")
    rss_mib = usage.ru_maxrss / 1024  # KiB on Linux
    return wall, usage.ru_utime + usage.ru_stime, rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = shutil.which("framepool")
    cli = [script] if script else [sys.executable, "-m", "api.cli"]
    cases = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "framepool --help": [*cli, "--help"],
        "framepool extract --help": [*cli, "extract", "--help"],
        "framepool train (usage error)": [*cli, "train", "--store", "s"],
    }
    for argv in cases.values():  # warm the file cache once
        run_once(argv, env)
    rows = []
    for name, argv in cases.items():
        runs = [run_once(argv, env) for _ in range(args.repeats)]
        best = min(runs)
        rows.append((name, best[0], statistics.median(r[0] for r in runs), best[1], best[2]))
    load = os.getloadavg()[0]
    print(f"# {args.repeats} runs each, {os.cpu_count()} CPUs, load average {load:.1f}")
    print("| command | best wall s | median wall s | CPU s | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, best, median, cpu, rss in rows:
        print(f"| `{name}` | {best:.3f} | {median:.3f} | {cpu:.3f} | {rss:.0f} |")
    torch_best = rows[0][1]
    help_best = rows[1][1]
    print(f"\nframepool --help / import torch (best wall): {help_best / torch_best:.2f}")


if __name__ == "__main__":
    main()
