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
