"""Plots (matplotlib) of evaluation results: quality against latency, one curve per
layout (or policy family), and a sentence's read/write staircase. Written as PNG and SVG,
each atomically, with fixed metadata so the files depend only on the data."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from simulref.atomic import atomic_write


def _save_figure(fig, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg``, each through a temp file renamed into place."""
    paths = []
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in ("png", "svg"):
        path = stem.with_suffix(f".{fmt}")
        # Fixed metadata so the files depend only on the data (diffable SVG).
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        with atomic_write(path) as handle:
            fig.savefig(handle, format=fmt, metadata=metadata)
        paths.append(path)
    return paths


def _figure(width: float = 6.4, height: float = 4.8):
    # A bare Figure (no pyplot): no global state, no GUI backend, renders with Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_quality_latency(
    curves: Mapping[str, Sequence[tuple[float, float, int]]],
    stem: str | os.PathLike,
    *,
    offline: tuple[float, float] | None = None,
    quality: str = "BLEU",
    latency: str = "AL",
) -> list[Path]:
    """Quality against latency: one curve per layout through its (AL, BLEU, k) points,
    each point labelled with its k; the offline (read-everything) run as a star.

    Writes ``stem.png`` and ``stem.svg``; returns their paths."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "simulref"}):
        fig = _figure()
        ax = fig.add_subplot()
        for name, points in curves.items():
            pts = sorted(points, key=lambda p: p[2])
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            (line,) = ax.plot(xs, ys, marker="o", label=name)
            for x, y, k in pts:
                ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8, color=line.get_color())
        if offline is not None:
            ax.plot([offline[0]], [offline[1]], marker="*", markersize=14, linestyle="none",
                    color="black", label="offline")
        ax.set_xlabel(f"{latency} (source words)")
        ax.set_ylabel(quality)
        ax.set_title(f"{quality} vs {latency} across k")
        ax.grid(True, alpha=0.3)
        ax.legend()
        return _save_figure(fig, Path(stem))


def staircase_points(delays: Sequence[int]) -> tuple[list[int], list[int]]:
    """The read/write staircase as (x, y) vertices for a post-step plot: x = source
    words read, y = target words written; target word i appears once ``delays[i]``
    words are read."""
    return [0, *delays], list(range(len(delays) + 1))


def plot_staircase(
    delays: Mapping[str, tuple[Sequence[int], int | None]],
    source_length: int,
    stem: str | os.PathLike,
    *,
    title: str = "read/write staircase",
) -> list[Path]:
    """One staircase per run (label → (delays, k)); a run with a k also gets its wait-k
    diagonal (target word i after min(k + i, N) words read) dashed in the same colour.

    Writes ``stem.png`` and ``stem.svg``; returns their paths."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "simulref"}):
        fig = _figure()
        ax = fig.add_subplot()
        top = 1
        for label, (run_delays, k) in delays.items():
            xs, ys = staircase_points(run_delays)
            (line,) = ax.step(xs, ys, where="post", label=label)
            top = max(top, ys[-1])
            if k is not None and k <= source_length:
                # Diagonal y = x - k + 1 from (k, 1) to (N, N - k + 1).
                ax.plot([k - 1, source_length], [0, source_length - k + 1], linestyle="--",
                        linewidth=0.8, color=line.get_color())
        ax.axvline(source_length, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlim(0, source_length + 0.5)
        ax.set_ylim(0, top + 0.5)
        ax.set_xlabel("source words read")
        ax.set_ylabel("target words written")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        return _save_figure(fig, Path(stem))
