"""Outputs: the per-unit part files every layout starts from, and one module per final layout."""
