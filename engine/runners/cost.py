"""When an embedded Ray pays: a pure model of what the driver's threads measured.

The driver's threads share one interpreter: decoding, resizing and encoding run in parallel
(Pillow releases the GIL), Python code does not. The process's CPU time over the threads' wall
time says how many cores they keep busy (``cores_used``); Ray's processes could keep all of the
workers' cores busy, so at best they would be ``workers / cores_used`` times faster. Disk and
network waits cut both alike, so that bound is optimistic: Ray starts only when it promises at
least RAY_MIN_SPEEDUP and the time it would save exceeds its own cost, RAY_START_SECONDS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# What starting an embedded Ray costs a job whose threads keep the machine busy (bench/GAP.md).
RAY_START_SECONDS = 20.0
# The least speedup the estimate must promise: it cannot see disk limits (bench/GAP.md).
RAY_MIN_SPEEDUP = 1.5


@dataclass(frozen=True, slots=True)
class LaneMeasurement:
    """What the driver's threads measured: wall seconds per item and the cores they kept busy."""

    seconds_per_item: float
    cores_used: float


@dataclass(frozen=True, slots=True)
class RayEstimate:
    speedup: float  # how much faster Ray's processes could be, at best
    saved: float  # seconds they would save on the remaining items


def measure_lane(ends: Sequence[tuple[float, float]], threads: int) -> LaneMeasurement | None:
    """The measurement from (wall clock, process CPU clock) at each item's end, in end order:
    from the end of each thread's first item (which also pays one-off costs: first imports,
    codec start-up) to the latest item's end; None until each thread has finished two items."""
    threads = max(threads, 1)
    if len(ends) < 2 * threads:
        return None
    (wall0, cpu0), (wall1, cpu1) = ends[threads - 1], ends[-1]
    elapsed = max(wall1 - wall0, 1e-6)
    return LaneMeasurement(elapsed / (len(ends) - threads), (cpu1 - cpu0) / elapsed)


def estimate_ray(measured: LaneMeasurement, remaining: int, workers: int) -> RayEstimate:
    """What Ray's ``workers`` processes could gain over the threads on ``remaining`` items."""
    speedup = max(workers, 1) / max(measured.cores_used, 0.05)
    return RayEstimate(speedup, remaining * measured.seconds_per_item * (1 - 1 / speedup))


def worth_starting_ray(
    measured: LaneMeasurement | None,
    remaining: int | None,
    workers: int,
    *,
    start_seconds: float = RAY_START_SECONDS,
    min_speedup: float = RAY_MIN_SPEEDUP,
) -> bool:
    """Whether Ray would save time. An unknown number of items (``remaining`` None) is assumed
    long; nothing measured yet (``measured`` None) is not a reason to start."""
    if remaining is None:
        return True
    if measured is None:
        return False
    estimate = estimate_ray(measured, remaining, workers)
    return estimate.speedup >= min_speedup and estimate.saved > start_seconds
