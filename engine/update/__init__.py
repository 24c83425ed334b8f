"""``engine update``: change a finished dataset's outputs, rows or config without touching its images.

``core.update`` is the entry point; ``ids`` is also imported by the driver (packed row ids), so
this package imports nothing itself."""
