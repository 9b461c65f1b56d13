"""``python -m bench all`` / ``python -m bench NAME [NAME...]``: run scenarios, print the table.

Options: ``--smoke`` (tiny sizes, seconds; what tests/test_bench_smoke.py runs), ``--json FILE``
(also write the rows as JSON), ``--keep DIR`` (keep run directories there instead of a
temporary directory), ``--memory-large N`` (size of the large memory run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from .scenarios import SCENARIOS, Context, Row, memory


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), "
            f"Python {platform.python_version()}")


def format_table(rows: list[Row]) -> str:
    headers = ("scenario", "metric", "value", "compared with", "target", "met", "note")
    cells = []
    for row in rows:
        value = "" if row.value is None else f"{row.value:g} {row.unit}".strip()
        met = "" if row.met is None else ("yes" if row.met else "NO")
        cells.append((row.scenario, row.metric, value, row.reference, row.target, met,
                      row.note))
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths, strict=True)) + "  note"]
    lines.append("  ".join("-" * w for w in widths) + "  ----")
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c[:-1], widths, strict=True))
                     + "  " + c[-1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help=f"'all' or any of: {', '.join(SCENARIOS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write rows as JSON")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="keep run directories in DIR")
    parser.add_argument("--memory-large", type=int, default=None, metavar="N",
                        help="items in the large memory run (default 100000)")
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    scenarios = dict(SCENARIOS)
    if args.memory_large:
        scenarios["memory"] = partial(memory, large=args.memory_large)

    print(f"machine: {machine()}", flush=True)
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="batchflux-bench-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for name in names:
            workdir = base / name
            workdir.mkdir(parents=True, exist_ok=True)
            began = time.perf_counter()
            new = scenarios[name](Context(workdir, smoke=args.smoke))
            print(f"[{name}: {time.perf_counter() - began:.0f} s]", file=sys.stderr, flush=True)
            rows += new
    total = time.perf_counter() - started
    print(format_table(rows))
    missed = [r for r in rows if r.met is False]
    print(f"\n{len(rows)} rows, {sum(r.met is True for r in rows)} targets met, "
          f"{len(missed)} missed; {total:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "seconds": total, "smoke": args.smoke,
             "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
