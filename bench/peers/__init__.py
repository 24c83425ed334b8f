"""Peer tools the engine is compared with, one script each (run as subprocesses)."""
