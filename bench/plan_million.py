"""Benchmark (not a test): `plan` of a 1,000,000-item grid streams in flat memory.

Generates a manifest of 1000 prompts x 1000 seeds (and, for comparison, 100 x 100) in a
temporary directory, runs ``batchflux plan --json`` on each in a fresh subprocess, and prints
wall time and peak RSS side by side. Items are streamed; what grows with the grid is what a
run holds too: the keys of the items still to run (``batchflux.resume.scan_items``, 8 bytes
an item, plus the sorted copy it makes to find repeated requests).

    .venv/bin/python bench/plan_million.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import io, json, resource, sys, time
from batchflux.plan import plan_command
start = time.perf_counter()
out, err = io.StringIO(), io.StringIO()
status = plan_command(sys.argv[1], as_json=True, limit=10, max_items=2_000_000,
                      cost_per_image=None, out=out, err=err)
elapsed = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
plan = json.loads(out.getvalue()) if status == 0 else {}
print(json.dumps({"status": status, "items": plan.get("items"), "seconds": elapsed,
                  "peak_rss_mib": peak_kib / 1024, "err": err.getvalue()[:500]}))
"""


def write_manifest(directory: Path, prompts: int, seeds: int) -> Path:
    path = directory / f"grid-{prompts}x{seeds}.yaml"
    lines = [f'# {prompts} prompts x {seeds} seeds', "grid:", f'  seeds: "1-{seeds}"',
             "run:", "  max_items: 2000000", "prompts:"]
    lines += [f'  - "prompt number {n}: a lighthouse at dusk, variant {n * 7 % 13}"'
              for n in range(prompts)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def measure(path: Path) -> dict[str, object]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    result: dict[str, object] = json.loads(proc.stdout)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        small = measure(write_manifest(Path(tmp), 100, 100))
        large = measure(write_manifest(Path(tmp), 1000, 1000))
    print(f"{'grid':>12} {'items':>10} {'plan s':>8} {'wall s':>8} {'peak RSS MiB':>13}")
    for label, r in (("100x100", small), ("1000x1000", large)):
        print(f"{label:>12} {r['items']:>10,} {r['seconds']:>8.2f} {r['wall_seconds']:>8.2f} "
              f"{r['peak_rss_mib']:>13.1f}")
    ratio = float(large["peak_rss_mib"]) / float(small["peak_rss_mib"])  # type: ignore[arg-type]
    print(f"peak RSS ratio 1,000,000 / 10,000 items: {ratio:.2f}")
    return 0 if small["status"] == large["status"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
