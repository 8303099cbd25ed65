"""Runs benchmarks, and writes what they measured as JSON and as a Markdown table.

  python -m experiments.benchmarks                 # full suite (~10 minutes on a 2-core CPU)
  python -m experiments.benchmarks --quick         # about a minute
  python -m experiments.benchmarks --only greedy --only stats --out runs/bench

Every row compares a zipjax function with a baseline timed in the same process and reports
the ratio (candidate / baseline; for memory, peak growth / bytes held). Timings are never
asserted: on a loaded machine, absolute times drift, ratios much less.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from types import ModuleType
from typing import Sequence

from . import apply_merges
from . import batchnorm
from . import common
from . import first_zip
from . import greedy
from . import head_pairing
from . import official_zip
from . import stats
from . import zip_memory
from . import zip_stages

#: Every benchmark, in the order the suite runs them.
BENCHMARKS: dict[str, ModuleType] = {
    m.NAME: m for m in (greedy, stats, apply_merges, batchnorm, zip_stages, zip_memory,
                        first_zip, official_zip, head_pairing)
}

COLUMNS = ("Benchmark", "Case", "Time", "Baseline", "Baseline time", "Ratio", "Target", "Met",
           "Notes")


def environment() -> dict:
  """The machine and library versions, and how loaded the machine is."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import zipjax  # pylint: disable=g-import-not-at-top
  env = {
      "python": platform.python_version(),
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "numpy": np.__version__,
      "zipjax": zipjax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
  }
  try:
    env["niceness"] = os.nice(0)
  except OSError:
    pass
  if hasattr(os, "getloadavg"):
    env["load_average_start"] = list(os.getloadavg())
  return env


def run_suite(names: Sequence[str], scale: str, *, progress: bool = False) -> dict:
  """Runs the named benchmarks one after the other; a benchmark that raises is recorded with
  its error and the others still run. Returns the JSON-ready report."""
  if scale not in common.SCALES:
    raise ValueError(f"Unknown scale {scale!r}; expected one of {common.SCALES}.")
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    raise ValueError(f"Unknown benchmarks {unknown}; known: {list(BENCHMARKS)}.")
  report = {
      "suite": "zipjax benchmarks",
      "scale": scale,
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "environment": environment(),
      "benchmarks": [],
  }
  start = time.perf_counter()
  for name in names:
    module = BENCHMARKS[name]
    if progress:
      print(f"[{name}] {module.TITLE}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    entry = {"name": name, "title": module.TITLE, "baseline": module.BASELINE,
             "description": (module.__doc__ or "").strip()}
    try:
      result = module.run(scale, progress=progress)
      entry.update(rows=[r.to_json() for r in result.rows],
                   summary=common.jsonable(result.summary), remarks=list(result.remarks),
                   error=None)
    except Exception as e:  # pylint: disable=broad-except
      entry.update(rows=[], summary={}, remarks=[],
                   error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
      if progress:
        print(f"[{name}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    entry["seconds"] = time.perf_counter() - t0
    report["benchmarks"].append(entry)
  report["seconds"] = time.perf_counter() - start
  if hasattr(os, "getloadavg"):
    report["environment"]["load_average_end"] = list(os.getloadavg())
  return report


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _met(value: bool | None) -> str:
  return "-" if value is None else ("yes" if value else "NO")


def _target_text(target: dict | None) -> str:
  if not target:
    return "-"
  text = f"{target['op']} {target['value']:g}"
  return f"{text} ({target['label']})" if target.get("label") else text


def to_markdown(report: dict) -> str:
  """The report as Markdown: one table of every row, then each benchmark's remarks."""
  env = report["environment"]
  load = env.get("load_average_start")
  lines = [
      f"# zipjax benchmarks ({report['scale']})",
      "",
      f"{report['started']}; {env['cpu_count']} CPUs, backend {env['backend']}, jax "
      f"{env['jax']}, numpy {env['numpy']}"
      + (f"; load average at start {load[0]:.2f}" if load else "")
      + (f", niceness {env['niceness']}" if "niceness" in env else "")
      + f"; {report['seconds']:.0f} s in all.",
      "",
      "Ratio = time / baseline time, both measured in this process (memory: peak growth / "
      "bytes held); lower is better.",
      "",
      "| " + " | ".join(COLUMNS) + " |",
      "|" + "|".join("---" for _ in COLUMNS) + "|",
  ]
  for bench in report["benchmarks"]:
    for row in bench["rows"]:
      cells = (row["benchmark"], row["case"], common.fmt_seconds(row["seconds"]),
               row["baseline"], common.fmt_seconds(row["baseline_seconds"]),
               common.fmt_ratio(row["ratio"], row.get("measure", "time")),
               _target_text(row["target"]), _met(row["met"]), row["notes"] or "")
      lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  notes = []
  for bench in report["benchmarks"]:
    for remark in bench["remarks"]:
      notes.append(f"- {remark}")
    if bench["error"]:
      notes.append(f"- {bench['name']} FAILED: {bench['error'].splitlines()[0]}")
  if notes:
    lines += ["", *notes]
  return "\n".join(lines) + "\n"


def write(report: dict, out_dir: str) -> tuple[str, str]:
  """Writes results.json and results.md into ``out_dir``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "results.json")
  md_path = os.path.join(out_dir, "results.md")
  with open(json_path, "w") as f:
    json.dump(common.jsonable(report), f, indent=1, allow_nan=False)
    f.write("\n")
  with open(md_path, "w") as f:
    f.write(to_markdown(report))
  return json_path, md_path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.benchmarks", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"benchmarks: {', '.join(BENCHMARKS)}")
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_const", dest="scale", const="quick",
                    help="smaller sizes: about a minute")
  size.add_argument("--smoke", action="store_const", dest="scale", const="smoke",
                    help="the smallest sizes: seconds; checks the suite runs, times nothing useful")
  size.add_argument("--scale", choices=common.SCALES, dest="scale", help="smoke, quick or full")
  parser.set_defaults(scale="full")
  parser.add_argument("--only", action="append", default=[], metavar="NAME",
                      help="run only these benchmarks (repeat, or separate with commas); they "
                           "run in the suite's order")
  parser.add_argument("--out", default=os.path.join("runs", "benchmarks"),
                      help="output folder for results.json and results.md "
                           "(default: runs/benchmarks)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.list:
    for name, module in BENCHMARKS.items():
      print(f"{name:14s} {module.TITLE}")
    return 0
  names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    print(f"Unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}.", file=sys.stderr)
    return 2
  selected = [n for n in BENCHMARKS if n in names] if names else list(BENCHMARKS)
  report = run_suite(selected, args.scale, progress=not args.no_progress)
  json_path, md_path = write(report, args.out)
  print(to_markdown(report))
  print(f"written: {json_path}, {md_path}")
  return 1 if any(b["error"] for b in report["benchmarks"]) else 0
