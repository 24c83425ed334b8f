"""The cost model that decides when an embedded Ray pays (engine.runners.cost): pure functions
of what the driver's threads measured."""

from __future__ import annotations

import pytest

from engine.runners.cost import (
    RAY_MIN_SPEEDUP,
    RAY_START_SECONDS,
    LaneMeasurement,
    estimate_ray,
    measure_lane,
    worth_starting_ray,
)


def _ends(seconds_per_item: float, cores_used: float, items: int) -> list[tuple[float, float]]:
    """(wall, CPU) clocks of items that ended every ``seconds_per_item`` with ``cores_used`` cores busy."""
    return [(i * seconds_per_item, i * seconds_per_item * cores_used) for i in range(1, items + 1)]


def _worth(
    seconds_per_item: float,
    cores_used: float,
    items: int,
    remaining: int | None,
    workers: int = 2,
    threads: int = 2,
) -> bool:
    return worth_starting_ray(
        measure_lane(_ends(seconds_per_item, cores_used, items), threads), remaining, workers
    )


def test_each_threads_first_item_is_left_out_and_one_more_round_is_needed():
    assert measure_lane([], 2) is None
    assert measure_lane(_ends(0.03, 1.0, 3), 2) is None
    assert measure_lane(_ends(0.03, 1.0, 4), 2) == LaneMeasurement(pytest.approx(0.03), pytest.approx(1.0))
    # the clocks from the end of the last thread's first item: a slow first item does not count
    slow_start = [(5.0, 5.0), (5.1, 5.1), (5.2, 5.3), (5.3, 5.5)]
    assert measure_lane(slow_start, 2) == LaneMeasurement(pytest.approx(0.1), pytest.approx(2.0))
    assert measure_lane(_ends(0.03, 1.0, 2), 0) is not None  # no threads counts as one


def test_nothing_measured_never_starts_ray_and_an_unknown_length_always_does():
    assert not _worth(0.03, 1.0, items=3, remaining=100_000)
    assert worth_starting_ray(None, None, 2)
    assert _worth(0.6, 1.9, items=6, remaining=None)  # unknown length: assume long


def test_ray_starts_only_where_its_processes_promise_a_real_gain():
    # image work keeps both cores busy in threads: Ray would only add its start-up
    assert not _worth(0.6, 1.9, items=6, remaining=10_000)
    # threads already keeping 1.4 of 2 cores busy: Ray promises too little
    assert not _worth(0.015, 1.4, items=6, remaining=100_000)
    # GIL-bound work: one core busy of two; worth Ray's cost only for a long job
    assert not _worth(0.03, 1.0, items=6, remaining=100)  # 1.5 s saved < Ray's cost
    assert _worth(0.03, 1.0, items=6, remaining=2_000)  # 30 s saved
    # promised ~8 s: 50k pass-through rows of 150 KB looked like this and ran slower on Ray
    assert not _worth(0.1, 1.17, items=6, remaining=192)
    # promised ~14 s, saved nothing, once the parts stopped copying the images (same job)
    assert not _worth(0.16, 1.10, items=6, remaining=192)
    # on 16 cores, threads keeping 6 busy leave most of the machine to Ray
    assert _worth(0.1, 6.0, items=40, remaining=1_000, workers=16, threads=16)
    assert not _worth(0.1, 15.0, items=40, remaining=1_000, workers=16, threads=16)


def test_the_estimate_and_its_two_thresholds():
    gil_bound = LaneMeasurement(seconds_per_item=0.03, cores_used=1.0)
    estimate = estimate_ray(gil_bound, remaining=2_000, workers=2)
    assert estimate.speedup == pytest.approx(2.0)
    assert estimate.saved == pytest.approx(30.0)  # 60 s of work, half of it saved
    assert worth_starting_ray(gil_bound, 2_000, 2)
    assert not worth_starting_ray(gil_bound, 2_000, 2, start_seconds=30.0)  # must save more than it costs
    assert not worth_starting_ray(gil_bound, 2_000, 2, min_speedup=2.5)
    # a lane that measured almost no CPU (waiting on I/O): the speedup is capped, not infinite
    assert estimate_ray(LaneMeasurement(0.01, 0.0), 10, 2).speedup == pytest.approx(40.0)
    assert estimate_ray(gil_bound, 100, 0).speedup == pytest.approx(1.0)  # no workers counts as one
    assert RAY_START_SECONDS == 20.0 and RAY_MIN_SPEEDUP == 1.5
