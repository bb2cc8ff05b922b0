"""Did anything else use the CPU while a cell was timed? (Linux; elsewhere the answer is unknown.)

A CPU cell's latency is only worth comparing when the process had the cores to itself. The timed
calls are bracketed by two readings of ``/proc/stat`` (CPU time spent by the whole machine, the
hypervisor's steal included) and ``/proc/self/stat`` (CPU time spent by this process, all its
threads); the machine's busy time minus this process's, over the wall time between the readings, is
how many cores other processes (or the hypervisor) took meanwhile: ``others_cores``. Resolution is
one clock tick (usually 10 ms) per core, so readings over a few hundred milliseconds are meaningful.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CONTENDED_CORES = 0.25  # others took more than a quarter of a core on average: the cell was contended
_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


@dataclass(frozen=True)
class CpuReading:
    wall_s: float
    machine_busy_s: float  # all CPUs: user, nice, system, irq, softirq, steal
    process_s: float  # this process: user + system, every thread


def read() -> CpuReading | None:
    """The CPU time counters now, or None where /proc cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    busy = user + nice + system + irq + softirq + steal
    utime, stime = int(own[11]), int(own[12])  # fields 14 and 15 of /proc/self/stat
    return CpuReading(time.perf_counter(), busy * _TICK_S, (utime + stime) * _TICK_S)


def others_cores(before: CpuReading | None, after: CpuReading | None) -> float | None:
    """Cores' worth of CPU time other processes took between two readings (None when unknown)."""
    if before is None or after is None or after.wall_s <= before.wall_s:
        return None
    others = (after.machine_busy_s - before.machine_busy_s) - (after.process_s - before.process_s)
    return max(others, 0.0) / (after.wall_s - before.wall_s)
