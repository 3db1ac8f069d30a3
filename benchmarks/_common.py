"""Shared helpers of the benchmark scripts: the machine's description and a timer."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine_description() -> str:
    """CPU model, logical CPUs, torch version and threads, Python version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); Python {platform.python_version()}{gpu}"
    )


def best_time(
    fn: Callable[[], object], reps: int, budget_s: float = float("inf"), device: str = "cpu"
) -> float:
    """Minimum wall time of ``fn()`` over ``reps`` runs after one warm-up (fewer runs when one
    run is slow against ``budget_s``).  The minimum, not the median: on a shared machine other
    processes only ever add time."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if budget_s != float("inf"):
        reps = max(1, min(reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def alternating_min_ms(
    fns: list[Callable[[], object]], repeats: int, warmup: int = 2
) -> list[float]:
    """Per function, the fastest of ``repeats`` timed calls in milliseconds, the functions
    taking turns so that load from other processes hits them alike (median times on a shared
    2-core machine swing by 2x; the minimum is the stable estimate)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(1000 * (time.perf_counter() - t0))
    return [min(t) for t in times]


def write_outputs(prefix: str, result: dict, markdown: str) -> None:
    """Write ``prefix.json`` (the result) and ``prefix.md`` (its table) atomically, print the
    table."""
    from lorank._io import atomic_write_bytes

    atomic_write_bytes(prefix + ".json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(prefix + ".md", (markdown + "\n").encode())
    print(markdown)


def run_info(script: str, argv: list[str] | None, threads: int, t_start: float) -> dict:
    """The ``machine``, ``command``, ``threads`` and ``total_seconds`` entries of a result."""
    import sys

    words = argv if argv is not None else sys.argv[1:]
    return {"machine": machine_description(), "threads": threads,
            "command": " ".join(["python", script, *words]),
            "total_seconds": time.time() - t_start}


def finish(out: str, result: dict, to_markdown: Callable[[dict], str],
           plot: Callable[[dict, Path], None]) -> None:
    """Write ``out`` + ``.png``, ``.json`` and ``.md`` (atomically); print the table."""
    markdown = to_markdown(result)
    plot(result, Path(out + ".png"))
    write_outputs(out, result, markdown)


def new_axes(figsize: tuple[float, float] = (6, 4)):
    """``(figure, axes)`` from matplotlib's file-only Agg backend, or None (and a message)
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; no plot")
        return None
    return plt.subplots(figsize=figsize)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def footer(res: dict) -> str:
    """The line under a results table: command, wall time, machine, threads."""
    return (f"Command: `{res['command']}` ({res['total_seconds'] / 60:.1f} min); machine: "
            f"{res['machine']}; {res['threads']} thread(s).")
