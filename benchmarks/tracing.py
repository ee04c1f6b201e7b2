"""Where a GPU waits for its host: kernel timeline and host-GPU syncs of a few steps.

Used by ``benchmarks/fastpath.py`` for cases with ``"trace": True``:

- :func:`busy`: from a ``torch.profiler`` run, the share of the window the GPU runs kernels
  and its longest idle gaps (with the kernels either side);
- :class:`SyncLog`: every host-GPU sync (``torch.cuda.set_sync_debug_mode``) with the
  Python lines that asked for it, counted per step;
- :class:`HostSampler`: what the host's main thread ran (Python stacks sampled every 2 ms),
  reported by :func:`busy` for each long GPU gap.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
import warnings
from collections import Counter

MARK = "vlmfit_clock_mark"


class HostSampler:
    """Context: sample the main thread's innermost Python frames every ``every`` seconds.
    Call :meth:`mark` inside the profiled window (it records a profiler range at a known
    host time) so :func:`busy` can line samples up with the GPU timeline."""

    def __init__(self, every: float = 0.002, frames: int = 4):
        self.every, self.frames = every, frames
        self.samples: list[tuple[float, str]] = []
        self.marks: list[float] = []
        self._main = threading.main_thread().ident
        self._stop = threading.Event()

    def mark(self) -> None:
        import torch

        self.marks.append(time.perf_counter())
        with torch.profiler.record_function(MARK):
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            frame = sys._current_frames().get(self._main)
            stack = traceback.extract_stack(frame)[-self.frames :] if frame else []
            where = " < ".join(
                f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(stack)
            )
            self.samples.append((time.perf_counter(), where))

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def _host_during(prof, sampler: HostSampler | None, holes: list) -> list:
    """For each gap (ms, before, after, start_us, end_us): the main thread's two most
    sampled stacks while the GPU idled, with their sample counts."""
    if sampler is None or not sampler.marks:
        return [None] * len(holes)
    starts = sorted(e.time_range.start for e in prof.events() if e.name == MARK)
    if len(starts) != len(sampler.marks):
        return [None] * len(holes)
    offset = sum(m * 1e6 - s for m, s in zip(sampler.marks, starts, strict=True)) / len(starts)
    out = []
    for *_, start, end in holes:
        lo, hi = (start + offset) / 1e6, (end + offset) / 1e6
        seen = Counter(w for t, w in sampler.samples if lo <= t <= hi)
        out.append(seen.most_common(2))
    return out


def busy(prof, gaps: int = 8, min_gap_ms: float = 0.5, sampler: HostSampler | None = None):
    """GPU busy fraction over the profiled window, total idle in gaps over ``min_gap_ms``,
    and the ``gaps`` longest idle gaps as (ms, kernel before, kernel after[, host stacks])."""
    from torch.autograd import DeviceType

    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not kernels:
        return {"gpu_busy": None}
    merged: list[list] = []
    holes = []
    for start, end, name in kernels:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1], merged[-1][2] = end, name
            continue
        if merged:
            gap = (start - merged[-1][1]) / 1e3
            holes.append((gap, merged[-1][2][:60], name[:60], merged[-1][1], start))
        merged.append([start, end, name])
    span = merged[-1][1] - merged[0][0]
    kernel_us = sum(end - start for start, end, _ in merged)
    holes.sort(reverse=True)
    host = _host_during(prof, sampler, holes[:gaps])
    return {
        "gpu_busy": kernel_us / span,
        "window_ms": span / 1e3,
        "idle_ms_in_long_gaps": sum(h[0] for h in holes if h[0] > min_gap_ms),
        "longest_gaps": [
            [round(h[0], 2), h[1], h[2]] + ([on_host] if on_host else [])
            for h, on_host in zip(holes[:gaps], host, strict=True)
        ],
    }


class SyncLog:
    """Context: count host-GPU syncs by the innermost Python lines that caused them."""

    def __init__(self, frames: int = 3):
        self.frames = frames
        self.count: Counter = Counter()

    def __enter__(self):
        import torch

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" not in str(message):
                return
            stack = [
                f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}"
                for f in traceback.extract_stack()[:-2]
                if "warnings" not in f.filename and "tracing.py" not in f.filename
            ]
            self.count[" < ".join(reversed(stack[-self.frames :]))] += 1

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        return False

    def per_step(self, steps: int) -> dict[str, float]:
        return {k: v / steps for k, v in self.count.most_common()}
