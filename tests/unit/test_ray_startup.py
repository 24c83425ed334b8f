"""ray_running(): read from sys.modules, and safe while another thread is importing ray."""

import sys
import types

from engine.runners.ray_startup import ray_running


def test_no_ray_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert ray_running() is False
    assert "ray" not in sys.modules


def test_half_imported_ray_is_not_running(monkeypatch):
    # the lazy start imports ray in a thread; until its __init__ has bound is_initialized, a unit
    # thread asking must not fail (it did: "partially initialized module 'ray' has no attribute")
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    assert ray_running() is False


def test_ray_imported_asks_it(monkeypatch):
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: True
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert ray_running() is True
    fake.is_initialized = lambda: False
    assert ray_running() is False
