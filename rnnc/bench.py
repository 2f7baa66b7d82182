"""Timing for `rnnc bench`: interleaved rounds, median and spread, JSON/CSV/plot output.

On a busy host a machine's speed drifts between measurements; timing one backend after another
ranks them by when they ran. So every round calls each job once, in turn, and the rounds go on until
every job has `repeat` samples and the rounds have taken `min_time` seconds per job: each job's
samples span the same stretch of time. Reported: the median, the quartiles and the extremes.
"""
from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

#: Rounds stop here even if min_time is not reached (very fast calls).
MAX_ROUNDS = 1000


@dataclass
class Stats:
    """One job's timings in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    samples: int

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> "Stats":
        ordered = sorted(times_ms)
        if len(ordered) > 1:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), q1, q3, ordered[0], ordered[-1], len(ordered))

    def text(self) -> str:
        """'12.345 ±0.678': the median and half the interquartile range."""
        return f"{self.median_ms:.3f} ±{(self.q3_ms - self.q1_ms) / 2:.3f}"


def measure(jobs: dict[str, Callable[[], object]], repeat: int, min_time: float, warmup: int = 2,
            sync: Callable[[], None] = lambda: None,
            progress: Callable[[str], None] = lambda line: None) -> dict[str, Stats]:
    """Time every job in interleaved rounds (see the module docstring); {job: Stats}."""
    for name, fn in jobs.items():
        for _ in range(warmup):
            fn()
        sync()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    start = last_note = time.perf_counter()
    budget = min_time * len(jobs)
    rounds = 0
    while rounds < MAX_ROUNDS and (rounds < repeat or time.perf_counter() - start < budget):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if time.perf_counter() - last_note > 2.0:
            last_note = time.perf_counter()
            progress(f"round {rounds} ({time.perf_counter() - start:.0f} s)")
    return {name: Stats.of(ts) for name, ts in times.items()}


@dataclass
class Row:
    """One backend at one sequence length; `note` says why it has no timings."""

    backend: str
    T: int
    forward: Stats | None = None
    forward_backward: Stats | None = None
    note: str = ""


def write_json(path: Path, meta: dict, rows: list[Row]) -> None:
    data = dict(meta, results=[{"backend": r.backend, "T": r.T, "note": r.note,
                                "forward": asdict(r.forward) if r.forward else None,
                                "forward_backward": asdict(r.forward_backward) if r.forward_backward else None}
                               for r in rows])
    path.write_text(json.dumps(data, indent=2) + "\n")


CSV_FIELDS = ("backend", "T", "pass", "median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "samples", "note")


def write_csv(path: Path, rows: list[Row]) -> None:
    """One line per backend, length and pass (forward / forward_backward)."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(CSV_FIELDS)
        for r in rows:
            for name in ("forward", "forward_backward"):
                s = getattr(r, name)
                values = [] if s is None else [f"{v:.6g}" for v in list(asdict(s).values())[:-1]] + [s.samples]
                out.writerow([r.backend, r.T, name, *(values or [""] * 6), r.note])


def plot(path: Path, title: str, rows: list[Row]) -> None:
    """Time against T per backend, forward and forward+backward side by side (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, name in zip(axes, ("forward", "forward_backward")):
        for backend in dict.fromkeys(r.backend for r in rows):
            points = [(r.T, getattr(r, name)) for r in rows if r.backend == backend and getattr(r, name)]
            if not points:
                continue
            ts = [t for t, _ in points]
            med = [s.median_ms for _, s in points]
            ax.errorbar(ts, med, yerr=[[m - s.q1_ms for m, (_, s) in zip(med, points)],
                                       [s.q3_ms - m for m, (_, s) in zip(med, points)]],
                        marker="o", capsize=3, label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("ms (median, IQR bars)")
        ax.set_title(name.replace("_", "+"))
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
