"""How much memory this process may still take, and a one-line refusal when a planned allocation cannot fit.

Why: a file's header (a 100 kB gzip NRRD claiming 8 GB) or an option (`finetune --batch-size 100000`) decides
how much memory a run takes; without a check before the allocation, the run takes the machine's memory and
then fails (or is killed) with a traceback. Stdlib only, so every layer can use it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


class NotEnoughMemory(ValueError):
    """A planned allocation larger than the memory available; the message says how much of each."""


def _cgroup_room() -> int | None:
    """Bytes left under this container's cgroup (v2, then v1) memory limit, or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(int(limit) - usage, 0)
        return None
    return None


def _system_available() -> int | None:
    """Memory the system can give without swapping: MemAvailable on Linux, available physical memory on
    Windows, free pages elsewhere (an underestimate on macOS, which is the safe side)."""
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    if sys.platform == "win32":
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
                (name, ctypes.c_ulonglong)
                for name in ("total", "avail", "total_page", "avail_page", "total_virt", "avail_virt", "ext")
            ]

        status = _Status()
        status.length = ctypes.sizeof(_Status)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.avail)
        return None
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smallest of the system's available memory, the room under
    a cgroup limit and the address-space limit (`ulimit -v`). None when nothing can be learnt."""
    candidates = [_system_available(), _cgroup_room()]
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            candidates.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def gigabytes(nbytes: float) -> str:
    """A byte count for a message: '8.59 GB', '120 MB', '4,800 GB'."""
    if nbytes >= 100e9:
        return f"{nbytes / 1e9:,.0f} GB"
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.3g} GB"
    if nbytes >= 1e6:
        return f"{nbytes / 1e6:.0f} MB"
    return f"{nbytes / 1e3:.0f} kB" if nbytes >= 1e3 else f"{max(int(nbytes), 0)} bytes"


def require_memory(nbytes: int, what: str, hint: str = "") -> None:
    """Raise NotEnoughMemory when `nbytes` (the planned peak) exceeds the memory available; `what` names the
    allocation ("volume.nrrd declares 2048×2048×2048 int16 voxels"), `hint` says what the user can do."""
    available = available_memory()
    if available is not None and nbytes > available:
        suffix = f"; {hint}" if hint else ""
        raise NotEnoughMemory(
            f"{what}: that needs about {gigabytes(nbytes)} of memory, but only {gigabytes(available)} is "
            f"available{suffix}"
        )


__all__ = ["NotEnoughMemory", "available_memory", "gigabytes", "require_memory"]
