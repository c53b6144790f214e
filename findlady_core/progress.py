"""One small progress protocol for every long loop of the core.

A progress callback is ``callback(phase, done, total)``: ``phase`` names the step (one of
``PHASES``), ``done`` and ``total`` count units of work inside it (0 <= done <= total). A phase
starts with ``done == 0`` and ends with ``done == total``. The units are chosen so that equal
units cost about equal time (bytes to load, similarity-product sizes to re-synchronize, neurons
to check), so a rate measured on the work done so far gives an honest estimate of the rest.

Callers pass ``progress=`` to ``resync``, ``check_integrity``, ``report.verify``: a callback,
``True`` (a tqdm bar per phase on stderr, ``TqdmProgress``), or ``None``/``False`` (nothing).
A callback may raise to stop the work (the service's job runner raises when its worker shuts
down); the core leaves no partial output behind, it only ever returns whole results.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

Progress = Callable[[str, int, int], None]
PHASES = ("load", "null", "resync", "integrity", "watermark", "write")


def as_callback(progress: bool | Progress | None) -> Progress | None:
    """``True`` -> a tqdm renderer on stderr, a callable -> itself, anything else -> None."""
    if progress is True:
        return TqdmProgress()
    return progress if callable(progress) else None


def renamed(progress: Progress | None, phase: str) -> Progress | None:
    """``progress`` with every phase reported as ``phase`` (the null is a re-synchronization)."""
    if progress is None:
        return None
    return lambda _phase, done, total: progress(phase, done, total)


def tick(progress: Progress | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, int(done), int(total))


class TqdmProgress:
    """A tqdm bar per phase on ``file`` (stderr), closed when the next phase begins.

    ``smoothing=0``: the rate is all work done over all time spent in the phase, never the
    last step alone; with units weighted by cost (see the module doc) the ETA is honest from
    the first update on. Percent, not unit counts: the units are costs, not things.
    """

    FORMAT = "{desc:<9} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file or sys.stderr
        self.phase: str | None = None
        self.bar: Any = None
        self.last = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if phase != self.phase or self.bar is None:
            self.close()
            self.phase, self.last = phase, 0
            self.bar = tqdm(total=max(total, 1), desc=phase, file=self.file, leave=False, smoothing=0,
                            bar_format=self.FORMAT, mininterval=0.2)
        if total != self.bar.total:
            self.bar.total = max(total, 1)
        self.bar.update(max(0, done - self.last))
        self.last = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.phase = None, None


class Recorder:
    """A callback that keeps every call (tests, and callers that want the timeline)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, float]] = []

    def __call__(self, phase: str, done: int, total: int) -> None:
        self.calls.append((phase, done, total, time.monotonic()))

    def phases(self) -> list[str]:
        out: list[str] = []
        for phase, *_ in self.calls:
            if not out or out[-1] != phase:
                out.append(phase)
        return out
