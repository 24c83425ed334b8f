"""Outputs: the Store, the per-unit part files every layout starts from, and the shard assembly
(row groups read back from the parts); the layouts themselves are in ``engine.layouts``."""
