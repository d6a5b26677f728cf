"""Run benchmarks several times, each in a fresh process, and report every ratio's spread.

One run of a benchmark on a shared 2-core machine is one sample: its ratio moves by several
percent from run to run. This runner starts each benchmark `--runs` times (independent
processes, so no run inherits another's warm caches), collects the `RESULT <name>: <ratio>x
(goal <goal>) ...` lines they print (benchmarks.common.verdict), and prints per result the
min / median / max over the runs. A goal is MET only when the median meets it.

    .venv/bin/python -m benchmarks.repeat                 # 1-7 (`make bench`), 3 runs each
    .venv/bin/python -m benchmarks.repeat --runs 1 loop   # a quick look during development
    .venv/bin/python -m benchmarks.repeat sweep --args "--epochs 70"
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ("loop", "sweep", "cache_step", "cache_sweep", "search", "data", "tracking")
# A ratio is a number, or inf/nan (bench_search's share when a seed never reaches its target).
RESULT = re.compile(r"^RESULT (?P<name>.+?): (?P<ratio>-?[\d.]+|inf|nan)x \(goal (?P<goal>[^)]*)\)")
GOAL = re.compile(r"^(?P<op><=|>=)(?P<value>[\d.]+)")


def meets(goal: str, value: float) -> bool | None:
    """Whether `value` meets a goal such as `>=30x` or `<=1.10x` (None: no numeric goal)."""
    m = GOAL.match(goal.strip())
    if m is None:
        return None
    target = float(m["value"])
    return value >= target if m["op"] == ">=" else value <= target


def run_once(name: str, args: list[str], timeout: float) -> tuple[dict[str, tuple[float, str]], str]:
    """One benchmark process: its RESULT lines as name -> (ratio, goal), and its whole output."""
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.bench_{name}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"bench_{name} exited {proc.returncode}:\n{out[-3000:]}")
    found = {m["name"]: (float(m["ratio"]), m["goal"]) for m in map(RESULT.match, proc.stdout.splitlines()) if m}
    return found, out


def summary(name: str, ratios: list[float], goal: str) -> str:
    med = statistics.median(ratios)
    ok = meets(goal, med)
    status = "" if ok is None else (" MET" if ok else " MISSED")
    return (f"SUMMARY {name}: median {med:.3f}x (min {min(ratios):.3f}x, max {max(ratios):.3f}x, "
            f"{len(ratios)} runs; goal {goal}){status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="*", default=list(DEFAULT), help="names after bench_ (default: 1-7)")
    parser.add_argument("--runs", type=int, default=3, help="independent runs of each benchmark (default 3)")
    parser.add_argument("--args", default="", help="extra arguments for every benchmark named")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--verbose", action="store_true", help="also print each run's own output")
    opts = parser.parse_args()
    for name in opts.benchmarks:
        results: dict[str, list[float]] = {}
        goals: dict[str, str] = {}
        for i in range(opts.runs):
            found, out = run_once(name, shlex.split(opts.args), opts.timeout)
            if opts.verbose:
                print(out, flush=True)
            for result, (ratio, goal) in found.items():
                results.setdefault(result, []).append(ratio)
                goals[result] = goal
            print(f"bench_{name} run {i + 1}/{opts.runs}: "
                  + "; ".join(f"{r} {v:.3f}x" for r, (v, _) in found.items()), flush=True)
        for result, ratios in results.items():
            print(summary(result, ratios, goals[result]), flush=True)


if __name__ == "__main__":
    main()
