"""Peak resident memory over a block of work, sampled from a thread (ru_maxrss never goes down,
so it cannot measure one evaluation among several in the same process)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil


class PeakRSS:
    """`with PeakRSS() as m: ...` then m.peak_bytes (absolute) and m.delta_bytes (above the start)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self._proc = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self.start_bytes = 0
        self.peak_bytes = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self.start_bytes = self.peak_bytes = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


def directory_bytes(path: str | Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the saved weights (the number users compare; configs and JSON are not counted)."""
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())
