"""Run a command in a child process and measure it: wall time, CPU seconds, peak RSS."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcessRun:
    """What one child process did: its exit code, output and resource use."""

    argv: tuple[str, ...]
    returncode: int
    wall_seconds: float
    cpu_seconds: float  # user + system, the child alone (wait4)
    peak_rss_mib: float
    stdout: str
    stderr: str

    def check(self) -> ProcessRun:
        """Raise with the child's output when it failed."""
        if self.returncode != 0:
            raise RuntimeError(f"{' '.join(self.argv[:4])} ... exited {self.returncode}:\n"
                               f"{self.stdout[-2000:]}\n{self.stderr[-4000:]}")
        return self


def run_measured(argv: Sequence[str], *, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None, timeout: float = 1800.0) -> ProcessRun:
    """Run ``argv`` to completion; ``os.wait4`` gives this child's own rusage.

    Output goes to temporary files (not pipes) so that no reader thread competes for the CPU
    and the child can be reaped with ``wait4`` directly.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env) if env else None,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ProcessRun(
            argv=tuple(argv),
            returncode=proc.returncode,
            wall_seconds=wall,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            peak_rss_mib=usage.ru_maxrss / 1024.0,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the ")" of the command name: state is field 0, utime 11, stime 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
