"""The fetch buffer's size estimate, which caps the look-ahead before bodies have come."""

from __future__ import annotations

import pytest

from engine.sources.http import FIRST_SIZES, _ByteGate


def test_the_guess_holds_until_the_first_bodies_then_their_mean_replaces_it():
    gate = _ByteGate(256 << 20)
    guess = gate.mean
    sizes = [100_000, 140_000, 120_000, 180_000][:FIRST_SIZES]
    for size in sizes[:-1]:
        gate.note_size(size)
        assert gate.mean == guess  # a few bodies are no estimate yet
    gate.note_size(sizes[-1])
    assert gate.mean == pytest.approx(sum(sizes) / len(sizes))  # not dragged towards the 1 MiB guess


def test_then_a_running_mean_follows_a_change_in_sizes():
    gate = _ByteGate(256 << 20)
    for _ in range(FIRST_SIZES):
        gate.note_size(100_000)
    for _ in range(64):
        gate.note_size(4_000_000)  # the manifest moves on to photos
    assert gate.mean == pytest.approx(4_000_000, rel=0.02)


def test_the_first_sizes_let_every_waiting_request_in_at_once():
    # reservations are valued at the current mean: when the first small bodies show the 2 MiB
    # guess was high, the requests waiting behind it all start, not one per body released
    gate = _ByteGate(256 << 20)
    started: list[int] = []
    for i in range(128):  # the first guess fills the buffer
        gate.acquire(lambda i=i: started.append(i))
    assert len(started) == 128 and gate.held >= gate.limit
    for i in range(128, 428):
        gate.acquire(lambda i=i: started.append(i))
    assert len(started) == 128 and gate.waiting
    for _ in range(FIRST_SIZES):
        gate.note_size(130_000)
        gate.arrived(130_000)
    assert started == list(range(428))  # all of them, in order
    assert gate.pending == 428 - FIRST_SIZES and not gate.waiting


def test_a_released_body_and_a_forgotten_waiter_give_their_room_back():
    gate = _ByteGate(10 << 20)
    for _ in range(FIRST_SIZES):
        gate.note_size(1 << 20)
    started: list[str] = []
    for _ in range(10):
        gate.acquire(lambda: started.append("early"))
    first, second = (lambda: started.append("first")), (lambda: started.append("second"))
    gate.acquire(first)
    gate.acquire(second)
    assert started == ["early"] * 10
    assert gate.forget(first) and not gate.forget(first)  # a cancelled request leaves the line
    gate.arrived(1 << 20)  # a body in: still held, so nobody starts
    assert started == ["early"] * 10
    gate.release(1 << 20)
    assert started == ["early"] * 10 + ["second"]
    assert gate.pending == 10 and gate.bodies == 0 and not gate.waiting
