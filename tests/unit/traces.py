"""Comparing traces across engines: every engine must give the same trace; only the
``engine`` option recorded in the settings (which engine ran) may differ."""

from __future__ import annotations

from dataclasses import replace


def untimed(trace):
    """``trace`` without times and without the engine it was made with."""
    trace = trace.without_times()
    extra = {name: value for name, value in trace.settings.extra if name != "engine"}
    return replace(trace, settings=replace(trace.settings, extra=extra))
