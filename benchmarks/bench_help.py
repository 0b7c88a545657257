#!/usr/bin/env python
"""How long each ``pipelines/*.py --help`` takes (process start to exit), and which heavy modules it imports.

Runs every script's ``--help`` ``--rounds`` times, interleaved (the machine is shared), and prints the median
wall time and whether torch / open_clip were imported while building the help (``-X importtime``). The
target (issue 17, docs/CLI.md) is < 1 s. When the console scripts are installed next to this interpreter
(``pip install -e .``), ``anisogen-<name> --help`` is timed too.

    .venv/bin/python benchmarks/bench_help.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "transformers", "faiss", "datasets")


def run_help(script: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t0, res.returncode


def console_script(script: Path) -> Path | None:
    """The installed ``anisogen-<name>`` of ``pipelines/<name>.py``, or None."""
    exe = Path(sys.executable).parent / f"anisogen-{script.stem.replace('_', '-')}"
    return exe if exe.exists() else None


def run_console_help(exe: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t0, res.returncode


def heavy_imports(script: Path) -> list[str]:
    res = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    seen = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in seen]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    scripts = sorted((ROOT / "pipelines").glob("*.py"))
    times: dict[str, list[float]] = {s.name: [] for s in scripts}
    console: dict[str, list[float]] = {s.name: [] for s in scripts}
    codes: dict[str, int] = {}
    for _ in range(args.rounds):
        for s in scripts:
            t, rc = run_help(s)
            times[s.name].append(t)
            codes[s.name] = rc
            exe = console_script(s)
            if exe is not None:
                t, rc = run_console_help(exe)
                console[s.name].append(t)
                codes[s.name] = max(codes[s.name], rc)
    print(f"| script | median `--help` s ({args.rounds} rounds) | `anisogen-<name> --help` s | rc | "
          "heavy modules imported |")
    print("|---|---|---|---|---|")
    for s in scripts:
        heavy = ", ".join(heavy_imports(s)) or "none"
        cs = f"{statistics.median(console[s.name]):.2f}" if console[s.name] else "not installed"
        print(f"| {s.name} | {statistics.median(times[s.name]):.2f} | {cs} | {codes[s.name]} | {heavy} |")


if __name__ == "__main__":
    main()
