"""Progress goes through one reporter: a tqdm bar on stderr, or nothing (--quiet)."""

from __future__ import annotations

import sys
from typing import Protocol


class Progress(Protocol):
    def start(self, total: int, description: str, unit: str = "img") -> None: ...

    def advance(self, rows: int, rejected: int) -> None: ...

    def close(self) -> None: ...

    def message(self, text: str) -> None: ...


class NullProgress:
    def start(self, total: int, description: str, unit: str = "img") -> None: ...

    def advance(self, rows: int, rejected: int) -> None: ...

    def close(self) -> None: ...

    def message(self, text: str) -> None: ...


class BarProgress:
    """Images done and images/s on stderr; rejected rows in the postfix."""

    def __init__(self) -> None:
        self._bar = None
        self._rejected = 0

    def start(self, total: int, description: str, unit: str = "img") -> None:
        from tqdm import tqdm

        self.close()
        self._rejected = 0
        self._bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True,
                         smoothing=0.1, mininterval=0.5)

    def advance(self, rows: int, rejected: int) -> None:
        if self._bar is not None:
            self._rejected += rejected
            if rejected:
                self._bar.set_postfix(rejected=self._rejected, refresh=False)
            self._bar.update(rows)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def message(self, text: str) -> None:
        self.close()
        print(text, file=sys.stderr)
