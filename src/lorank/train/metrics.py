"""Run metrics: throughput, ``metrics.json`` (written atomically) and small text tables."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from lorank._io import atomic_write_json

METRICS_NAME = "metrics.json"


class Throughput:
    """Units (tokens, time steps) per second of training time only (evaluation excluded)."""

    def __init__(self, units: float = 0.0, seconds: float = 0.0):
        self.units, self.seconds = float(units), float(seconds)
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, units: float) -> None:
        if self._t0 is None:
            raise RuntimeError("Throughput.stop() without start()")
        self.seconds += time.perf_counter() - self._t0
        self.units += units
        self._t0 = None

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else 0.0


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_metrics(out_dir: str | os.PathLike, metrics: dict[str, Any]) -> None:
    """Write ``<out_dir>/metrics.json`` atomically (strict JSON: no NaN/inf)."""
    atomic_write_json(os.path.join(out_dir, METRICS_NAME), _clean(metrics))


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def markdown_table(header: list[str], rows: list[list[Any]], digits: int = 1) -> str:
    """A GitHub-markdown table; numbers right-aligned."""
    cells = [[fmt(c, digits) for c in r] for r in rows]
    def numeric(i: int) -> bool:
        vals = [r[i] for r in rows if r[i] is not None]
        return bool(vals) and all(isinstance(v, (int, float)) for v in vals)

    align = ["---:" if numeric(i) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


__all__ = ["Throughput", "write_metrics", "markdown_table", "fmt", "METRICS_NAME"]
