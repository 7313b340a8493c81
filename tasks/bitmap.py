"""The bit map: module -> rung, the interface between allocation and every backend."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import PipelineError
from tasks.ladder import Rung, split_key


@dataclass
class BitMap:
    method: str
    modules: dict[str, Rung]
    params: dict[str, int]  # parameter count per module, to weigh the average
    budget: float | None = None  # the requested budget in bpp (a rung's bpp for boost methods)
    options: dict = field(default_factory=dict)

    @property
    def nominal_bpp(self) -> float:
        total = sum(self.params.values())
        return sum(self.modules[k].bpp * n for k, n in self.params.items()) / total

    @property
    def base_bpp(self) -> float | None:
        return self.budget

    @property
    def extra_pct(self) -> float | None:
        if not self.budget:
            return None
        return 100.0 * (self.nominal_bpp - self.budget) / self.budget

    @property
    def mib(self) -> float:
        return sum(self.modules[k].mib(n) for k, n in self.params.items())

    def rung_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rung in self.modules.values():
            counts[rung.name] = counts.get(rung.name, 0) + 1
        return dict(sorted(counts.items()))

    def layers(self) -> list[int]:
        return sorted({split_key(k)[0] for k in self.modules})

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "nominal_bpp": round(self.nominal_bpp, 6),
            "base_bpp": self.base_bpp,
            "extra_pct": None if self.extra_pct is None else round(self.extra_pct, 4),
            "memory_mib": round(self.mib, 4),
            "options": self.options,
            "rung_counts": self.rung_counts(),
            "modules": {k: r.to_json() for k, r in self.modules.items()},
            "params": self.params,
        }

    def save(self, path: str | Path) -> Path:
        from tasks.artifacts import write_json_atomic

        return write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, data: dict) -> "BitMap":
        try:
            modules = {k: Rung.from_json(v) for k, v in data["modules"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise PipelineError(f"bit map is malformed: {exc!r}") from None
        params = {k: int(v) for k, v in data.get("params", {}).items()} or {k: 1 for k in modules}
        return cls(
            method=data.get("method", "unknown"),
            modules=modules,
            params=params,
            budget=data.get("budget"),
            options=data.get("options", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> "BitMap":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PipelineError(f"bit map file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise PipelineError(f"bit map {path} is not valid JSON: {exc}") from None
        return cls.from_json(data)


def uniform_bitmap(params: dict[str, int], rung: Rung) -> BitMap:
    return BitMap(method="uniform", modules={k: rung for k in params}, params=dict(params), budget=rung.bpp)
