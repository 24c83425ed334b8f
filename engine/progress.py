"""Progress goes through one reporter: a tqdm bar on stderr, or nothing (--quiet)."""

from __future__ import annotations

import sys
import time
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


def _downloaded_bytes() -> int:
    """Bytes this process has received over HTTP (0 when it fetched no URL)."""
    http = sys.modules.get("engine.sources.http")
    return http.downloaded_bytes() if http is not None else 0


class BarProgress:
    """Images done and images/s on stderr; rejected rows, and downloaded MB/s while images are
    fetched over HTTP in this process, in the postfix."""

    def __init__(self) -> None:
        self._bar = None
        self._rejected = 0
        self._started = 0.0
        self._bytes_at_start = 0

    def start(self, total: int, description: str, unit: str = "img") -> None:
        from tqdm import tqdm

        self.close()
        self._rejected = 0
        self._started, self._bytes_at_start = time.perf_counter(), _downloaded_bytes()
        self._bar = tqdm(
            total=total,
            desc=description,
            unit=unit,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
            mininterval=0.5,
        )

    def postfix(self) -> str:
        parts = [f"rejected={self._rejected:,}"] if self._rejected else []
        downloaded = _downloaded_bytes() - self._bytes_at_start
        if downloaded:
            elapsed = max(time.perf_counter() - self._started, 1e-3)
            parts.append(f"{downloaded / 1e6 / elapsed:.1f} MB/s downloaded")
        return ", ".join(parts)

    def advance(self, rows: int, rejected: int) -> None:
        if self._bar is not None:
            self._rejected += rejected
            self._bar.set_postfix_str(self.postfix(), refresh=False)
            self._bar.update(rows)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def message(self, text: str) -> None:
        self.close()
        print(text, file=sys.stderr)
