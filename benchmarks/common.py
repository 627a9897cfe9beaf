"""Shared helpers for the hydra_nb benchmarks: seeding, timing, machine info, JSON output, tables.

Run the benchmarks from the repository root, e.g. ``python benchmarks/overhead.py --quick``.
Results go to ``benchmarks/out/<name>.json`` (git-ignored).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

OUT_DIR = Path(__file__).resolve().parent / "out"


# -- seeding ---------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and, if present, CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def generator(seed: int) -> torch.Generator:
    """A fresh CPU generator: give one to each DataLoader so every run sees the same batch order."""
    return torch.Generator().manual_seed(seed)


# -- timing ----------------------------------------------------------------------------------
def sync(device) -> None:
    """Wait for queued device work (no-op on CPU), so that clock readings include it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``with Timer(device) as t: ...``; then ``t.seconds``. Synchronizes the device at both ends."""

    def __init__(self, device="cpu"):
        self.device = device
        self.seconds = math.nan

    def __enter__(self) -> "Timer":
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start
        return False


@contextmanager
def wall_clock(label: str):
    """Print the wall time of a whole script section."""
    start = time.perf_counter()
    yield
    print(f"[{label}] wall time {time.perf_counter() - start:.1f} s", flush=True)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs ignored."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def median(values) -> float:
    return float(statistics.median(values)) if values else math.nan


# -- files -----------------------------------------------------------------------------------
def dir_size(path) -> int:
    """Bytes of all files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    return obj


def write_json(name: str, payload: dict) -> Path:
    """Write ``payload`` to ``benchmarks/out/<name>.json`` (NaN/inf become null); returns the path."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    print(f"wrote {path}")
    return path


# -- machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device="cpu") -> dict:
    """What the numbers were measured on."""
    device = torch.device(device)
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        import hydra_nb

        info["hydra_nb_version"] = hydra_nb.__version__
    except Exception:  # pragma: no cover
        pass
    info.update(git_revision())
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


def git_revision() -> dict:
    """The repository's HEAD commit and whether hydra_nb/ has uncommitted changes (results depend on both)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hydra_nb"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": head or None, "hydra_nb_dirty": bool(dirty)}


# -- output ----------------------------------------------------------------------------------
def _fmt(v, digits: int) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 10 ** -digits):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None, digits: int = 4) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` picks and orders the keys."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c), digits) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def print_table(rows: list[dict], columns: list[str] | None = None, digits: int = 4, title: str | None = None) -> None:
    if title:
        print(f"\n### {title}\n")
    print(markdown_table(rows, columns, digits), flush=True)


def scratch_dir(where: str | None, needs_bytes: float, prefix: str) -> Path:
    """A fresh temporary folder under ``where`` (default: the system's), after checking that twice
    ``needs_bytes`` is free there; exits with a message saying to pass --dir otherwise."""
    root = Path(where or tempfile.gettempdir())
    free = shutil.disk_usage(root).free
    if free < 2 * needs_bytes:
        sys.exit(f"{root} has {fmt_bytes(free)} free; the store needs about {fmt_bytes(needs_bytes)} "
                 "(twice that free is required). Pass --dir.")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


# -- interference ----------------------------------------------------------------------------
def _proc_stat_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]) - idle, sum(vals[:8])


class LoadMeter:
    """How busy the machine was with *other* processes while a benchmark ran (Linux only).

    ``foreign_cpu_share``: CPU time used by other processes (and steal) divided by the CPU time
    available (wall × cores). Anything well above 0 means timings are disturbed by other work.
    """

    def __init__(self):
        self.start()

    def start(self) -> None:
        self._stat = _proc_stat_ticks()
        self._times = os.times()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()

    def read(self) -> dict:
        stat, times, wall = _proc_stat_ticks(), os.times(), time.perf_counter() - self._wall
        own = (times.user - self._times.user) + (times.system - self._times.system)  # clock ticks, like /proc/stat
        # own_cpu_s: this process's CPU time, all threads, at the clock's resolution (os.times counts 10 ms ticks,
        # too coarse for a 10 ms epoch); on a loaded machine it moves far less than wall time
        out = {"wall_s": wall, "own_cpu_s": time.process_time() - self._cpu, "foreign_cpu_share": None,
               "machine_busy_share": None}
        if stat is not None and self._stat is not None:
            hz = os.sysconf("SC_CLK_TCK")
            busy = (stat[0] - self._stat[0]) / hz
            total = (stat[1] - self._stat[1]) / hz
            if total > 0:
                out["machine_busy_share"] = busy / total
                # both counters tick at 1/hz: forgive two ticks of rounding
                out["foreign_cpu_share"] = max(0.0, busy - own - 2.0 / hz) / total
        return out
