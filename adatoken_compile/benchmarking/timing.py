"""Timing and memory: interleaved repeats, ratios, the realised fraction, the RSS high-water mark.

* **latency**: wall time (``time.perf_counter``), median over ``repeats`` after ``warmup`` runs;
  candidates run alternately in one process (:func:`interleaved`) so that machine noise hits all.
* **realized_fraction** = (1 - latency_ratio) / (1 - flops_ratio): the share of the FLOPs-ideal
  time saving the measurement realises (1: latency fell exactly as FLOPs did, 0: no speedup).
"""

from __future__ import annotations

import re
import resource
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------- timing


def _stats(runs: Sequence[float]) -> dict:
    a = np.asarray(runs, dtype=np.float64)
    return {
        "median_s": float(np.median(a)),
        "p25_s": float(np.percentile(a, 25)),
        "p75_s": float(np.percentile(a, 75)),
        "min_s": float(a.min()),
        "runs": [float(x) for x in a],
    }


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int = 7, warmup: int = 2) -> dict:
    """Time the candidates alternately in this process: ``warmup`` untimed rounds, then
    ``repeats`` timed rounds, each round calling every candidate once in the given order
    (A B A B ...). Returns ``{name: {"median_s", "p25_s", "p75_s", "min_s", "runs"}}``."""
    if not fns:
        raise ValueError("interleaved: no candidates")
    if repeats < 1:
        raise ValueError("interleaved: repeats must be >= 1")
    names = list(fns)
    for _ in range(max(0, warmup)):
        for n in names:
            fns[n]()
    runs: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            runs[n].append(time.perf_counter() - t0)
    return {n: _stats(runs[n]) for n in names}


def _seconds(x) -> float:
    if isinstance(x, Mapping):
        return float(x["median_s"])
    return float(x)


def ratio(a, b) -> float:
    """a / b for two timings (stats dicts from :func:`interleaved`, by median, or plain numbers)."""
    return _seconds(a) / _seconds(b)


def speedup(baseline, candidate) -> float:
    """baseline / candidate (> 1 means the candidate is faster)."""
    return _seconds(baseline) / _seconds(candidate)


def realized_fraction(latency_ratio: float, flops_ratio: float) -> float:
    """(1 - latency_ratio) / (1 - flops_ratio): share of the FLOPs-ideal time saving realised
    (nan when the FLOPs do not change)."""
    if abs(1.0 - flops_ratio) < 1e-12:
        return float("nan")
    return (1.0 - latency_ratio) / (1.0 - flops_ratio)


# ----------------------------------------------------------------------------- memory

_HWM_RE = re.compile(r"VmHWM:\s+(\d+)\s+kB")
_RSS_RE = re.compile(r"VmRSS:\s+(\d+)\s+kB")


def _proc_status_kb(rx) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = rx.search(f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (/proc/self/status VmRSS)."""
    return _proc_status_kb(_RSS_RE)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (write 5 to /proc/self/clear_refs).
    False where that is not possible (the peak then covers the whole process lifetime)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark (VmHWM; falls back to getrusage ru_maxrss, lifetime peak)."""
    v = _proc_status_kb(_HWM_RE)
    if v is not None:
        return v
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
