"""What the benchmarks read about the machine and its processes: the figures' context (machine())
and the CPU, memory and load counters of /proc they are computed from. Shared by bench.py and
media.py."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    out = (done.stdout or done.stderr).strip()
    return out.splitlines()[0] if out else "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from kemi_o365.launch import KAMAILIO_BIN, RTPENGINE_BIN

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_mb": mem_kb // 1024,
        "kernel": platform.release(),
        "os": first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "kamailio": first_line([KAMAILIO_BIN, "-v"]),
        "rtpengine": first_line([RTPENGINE_BIN, "--version"]),
        "sipp": first_line(["sipp", "-v"]),
        "python": platform.python_version(),
    }


def _stat_fields(pid: int | str) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of `pids` (threads included), seconds; a process gone meanwhile counts 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            f = _stat_fields(pid)
            total += int(f[11]) + int(f[12])
    return total / TICK


def group_pids(pgid: int) -> list[int]:
    """Every process in process group `pgid` (Kamailio's main process and its forked workers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if int(_stat_fields(entry.name)[2]) == pgid:
                out.append(int(entry.name))
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
