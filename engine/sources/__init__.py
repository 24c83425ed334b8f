"""Inputs: planning a manifest into small work-unit descriptors, reading them, fetching images."""
