"""Latency metrics for simultaneous translation (pure; no MLX, no numpy).

The definitions follow SimulEval 1.1.4's text-to-text scorers
(``simuleval/evaluator/scorers/latency_scorer.py``); YAAL and the degeneracy diagnostics
follow OmniSTEval 0.1.10 (``omnisteval/scoring.py``: ``YAALScorer``,
``ShortformDegeneracyScorer``). ``docs/metrics.md`` gives the
formulas, the conventions and where this module deliberately differs (bad input raises
``ValueError`` here where SimulEval divides by zero or asserts).

Units: ``delays`` are source words read before each target word (``d_i`` in ``0..|X|``)
and ``source_length`` is ``|X|``, the number of source words. The functions are unit-free,
so the computation-aware variants are the same functions applied to elapsed times with
``source_length`` given as the source duration in the same unit (seconds here).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Real

from simulref.checks import is_int
from simulref.trace import Read, Trace, Write

__all__ = [
    "ap",
    "al",
    "laal",
    "dal",
    "atd",
    "yaal",
    "degeneracy",
    "DEGENERACY_THRESHOLD",
    "hypothesis_delays",
    "computation_aware_delays",
    "latency_scores",
    "METRICS",
]

METRICS = ("AP", "AL", "LAAL", "DAL", "ATD")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def _delays(delays: Sequence[float], name: str = "delays") -> list[float]:
    if isinstance(delays, (str, bytes)) or not isinstance(delays, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(delays).__name__}")
    if len(delays) == 0:
        # SimulEval skips such a sentence (warning) and asserts if scored directly.
        raise ValueError(f"{name} is empty: latency is undefined for a hypothesis with no words")
    out = [_number(f"{name}[{i}]", d) for i, d in enumerate(delays)]
    if out[0] < 0:
        raise ValueError(f"{name} must be >= 0, got {name}[0] = {delays[0]!r}")
    for i in range(1, len(out)):
        # Reads (and clocks) only move forward, so a decreasing schedule is a caller bug.
        if out[i] < out[i - 1]:
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{i - 1}] = {delays[i - 1]!r} "
                f"> {name}[{i}] = {delays[i]!r}"
            )
    return out


def _positive(name: str, value: object) -> float:
    x = _number(name, value)
    if x <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return x


def ap(delays: Sequence[float], source_length: float, target_length: float) -> float:
    """Average Proportion: ``sum(d) / (|X| * |Y|)``."""
    d = _delays(delays)
    x = _positive("source_length", source_length)
    y = _positive("target_length", target_length)
    return math.fsum(d) / (x * y)


def al(delays: Sequence[float], source_length: float, target_length: float) -> float:
    """Average Lagging: ``1/tau * sum_{i<=tau} d_i - (i-1) |X|/|Y|``.

    ``tau`` is the first ``i`` with ``d_i >= |X|`` (``n`` if none). As in SimulEval, a
    first delay beyond the source (``d_1 > |X|``, possible only with times) is returned
    as it is."""
    d = _delays(delays)
    x = _positive("source_length", source_length)
    y = _positive("target_length", target_length)
    return lagging(d, x, y)


def lagging(d: Sequence[float], x: float, y: float) -> float:
    """AL's sum over checked arguments (delays ``d``, ``|X| = x``, ``|Y| = y``): the mean
    of ``d_i - (i - 1) x / y`` up to the first delay that reaches the source's end. Shared
    with the long-form scores, whose delays (offset by each sentence's start) may be
    negative."""
    if d[0] > x:
        return d[0]
    lags = []
    for i, di in enumerate(d):
        lags.append(di - i * x / y)
        if di >= x:
            break
    return math.fsum(lags) / len(lags)


def laal(delays: Sequence[float], source_length: float, reference_length: float) -> float:
    """Length-Adaptive Average Lagging: AL with ``|Y| = max(n, reference_length)``, so that
    an over-long hypothesis is not rewarded. ``reference_length = n`` gives plain AL over
    the hypothesis length (SimulEval's ``--no-use-ref-len``)."""
    d = _delays(delays)
    y = _positive("reference_length", reference_length)
    return al(d, source_length, max(len(d), y))


def dal(delays: Sequence[float], source_length: float) -> float:
    """Differentiable Average Lagging: ``g_1 = d_1``, ``g_i = max(d_i, g_{i-1} + |X|/n)``,
    ``DAL = mean_i g_i - (i-1) |X|/n``, ``n`` the hypothesis length (SimulEval uses ``n``
    whatever the reference length)."""
    d = _delays(delays)
    x = _positive("source_length", source_length)
    step = x / len(d)
    g = d[0]
    lags = [g]
    for i in range(1, len(d)):
        g = max(d[i], g + step)
        lags.append(g - i * step)
    return math.fsum(lags) / len(lags)


def atd(
    delays: Sequence[float],
    compute: Sequence[float] | None = None,
    *,
    word_duration: float = 1.0,
    target_token_duration: float | None = None,
) -> float:
    """Average Token Delay (Kano et al. 2023) as SimulEval computes it for text.

    ``delays`` are in source words. Source word ``j`` ends at ``j * word_duration``;
    target word ``t`` starts when its source prefix has arrived and the previous target
    word is done, lasts ``target_token_duration`` (default: ``word_duration``; SimulEval
    uses 1 virtual unit for text-to-text, 0 for text output from speech) plus its share
    of computation. ``compute`` (optional) holds, per target word, the cumulative
    computation time when it was complete (same unit as ``word_duration``). Target words
    of one chunk (equal delays) are paired with the source words of the matching chunk
    (see docs/metrics.md); ATD is the mean of ``end(target t) - end(paired source word)``.
    ``|X|`` and ``|Y|`` do not enter."""
    d = _delays(delays)
    w = _positive("word_duration", word_duration)
    tgt_len = w if target_token_duration is None else _number(
        "target_token_duration", target_token_duration
    )
    if tgt_len < 0:
        raise ValueError(f"target_token_duration must be >= 0, got {target_token_duration!r}")
    if compute is None:
        increments = [0.0] * len(d)
    else:
        if isinstance(compute, Sequence) and len(compute) != len(d):
            raise ValueError(
                f"compute must hold one time per delay ({len(d)}), got {len(compute)}"
            )
        c = _delays(compute, "compute")
        increments = [c[0]] + [c[i] - c[i - 1] for i in range(1, len(c))]
    for i, di in enumerate(d):
        if di != int(di):
            raise ValueError(f"delays must be whole source words for ATD, got delays[{i}] = {di}")

    # Chunks: runs of equal delays. Chunk c waited for source words (u_{c-1}, u_c].
    bounds: list[int] = []  # u_c, words read when chunk c was written
    chunk_of: list[int] = []  # chunk index (0-based) of each target word
    for di in d:
        if not bounds or int(di) != bounds[-1]:
            bounds.append(int(di))
        chunk_of.append(len(bounds) - 1)
    targets_before = [chunk_of.index(c) for c in range(len(bounds))]

    lags = []
    end = 0.0
    for t, di in enumerate(d, start=1):
        end = max(di * w, end) + tgt_len + increments[t - 1]
        c = chunk_of[t - 1]
        src_before = bounds[c - 1] if c else 0
        # Target words beyond the source words of earlier chunks are paired later on.
        paired = t - max(0, targets_before[c] - src_before)
        paired = min(paired, bounds[c])
        lags.append(end - paired * w)
    return math.fsum(lags) / len(lags)


def yaal(delays: Sequence[float], source_length: float, reference_length: float) -> float | None:
    """Yet Another Average Lagging (Polák et al. 2025), short-form, as OmniSTEval computes it.

    LAAL's lags ``d_i - (i-1) |X| / max(n, reference_length)``, averaged over the words
    written *before the source ended* (``d_i < |X|``; LAAL also counts the first word at
    ``|X|``). None when even the first word came at or after the end (``d_1 >= |X|``):
    YAAL is undefined there and OmniSTEval skips the instance, so a corpus mean is over
    the defined ones. ``reference_length = n`` gives the hypothesis-length variant."""
    d = _delays(delays)
    x = _positive("source_length", source_length)
    y = max(len(d), _positive("reference_length", reference_length))
    if d[0] >= x:
        return None
    # Words after the end of the source are no longer simultaneous: they are cut, not
    # averaged in (a degenerate policy that waits for the end scores by its early words).
    lags = [di - i * x / y for i, di in enumerate(d) if di < x]
    return math.fsum(lags) / len(lags)


DEGENERACY_THRESHOLD = 20.0  # |DSPTV| above this (percentage points): likely degenerate


def degeneracy(
    schedules: Iterable[tuple[Sequence[float], float, float]],
) -> dict[str, float | bool | None]:
    """OmniSTEval's short-form degeneracy diagnostics of a corpus (percent, 0-100).

    ``schedules``: per sentence ``(delays, source_length, reference_length)``, the delays
    possibly empty (a sentence without output adds nothing). A policy that writes most
    words only once the source has ended is "degenerate": its latency scores say little.

    - ``SWF`` (simultaneous words fraction): ``100 * sum_s #{d_i < |X_s|} / sum_s n_s``,
      micro-averaged over all words of all sentences.
    - ``EFSW`` (expected fraction of simultaneous words): ``100 * sum_s max(0, |X_s| -
      YAAL_s) / sum_s |X_s|`` over the sentences whose YAAL is defined: the share of the
      source that comes before the average lag.
    - ``DSPTV`` (degenerate simultaneous policy test value): ``EFSW - SWF`` (OmniSTEval's
      code; its docstring says ``SWF - EFSW``; the flag takes the absolute value).
    - ``degenerate``: ``|DSPTV| > 20``; False when DSPTV is undefined (as OmniSTEval).

    No words at all: every value NaN and ``degenerate`` None."""
    simultaneous = words = 0
    efsw_num: list[float] = []
    efsw_den: list[float] = []
    for n, item in enumerate(schedules):
        if not isinstance(item, tuple) or len(item) != 3:
            raise TypeError(
                f"schedules[{n}] must be a (delays, source_length, reference_length) tuple"
            )
        delays, source_length, reference_length = item
        x = _positive(f"schedules[{n}] source_length", source_length)
        if isinstance(delays, Sequence) and not isinstance(delays, (str, bytes)) and not delays:
            continue  # no output: no words to count (OmniSTEval adds nothing either)
        d = _delays(delays, f"schedules[{n}] delays")
        simultaneous += sum(di < x for di in d)
        words += len(d)
        lag = yaal(d, x, reference_length)
        if lag is not None:
            efsw_num.append(max(0.0, x - lag))
            efsw_den.append(x)
    nan = float("nan")
    if words == 0:
        return {"SWF": nan, "EFSW": nan, "DSPTV": nan, "degenerate": None}
    swf = 100.0 * simultaneous / words
    efsw = 100.0 * math.fsum(efsw_num) / math.fsum(efsw_den) if efsw_den else nan
    dsptv = efsw - swf
    return {"SWF": swf, "EFSW": efsw, "DSPTV": dsptv,
            "degenerate": bool(abs(dsptv) > DEGENERACY_THRESHOLD)}


# ---------------------------------------------------------------------------- traces


def hypothesis_delays(trace: Trace) -> list[tuple[int, float]]:
    """(delay, time) per hypothesis word, as SimulEval counts words: each Write's text is
    split on whitespace, every piece getting the Write's delay and time. Normally one word
    per Write; a whitespace-only Write counts for nothing."""
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a Trace, got {type(trace).__name__}")
    out: list[tuple[int, float]] = []
    read = 0
    for e in trace.events:
        if isinstance(e, Read):
            read += 1
        elif isinstance(e, Write):
            out += [(read, e.t)] * len(e.text.split())
    return out


def computation_aware_delays(
    trace: Trace, word_duration: float, *, start: float = 0.0
) -> tuple[list[float], float]:
    """SimulEval's ``elapsed`` for a text trace: ``(elapsed, source_duration)``, seconds.

    The source is taken to arrive at a steady pace, one word per ``word_duration``
    seconds (word ``j`` complete at ``j * word_duration``); as SimulEval does for speech
    input, the elapsed time of target word ``i`` is the source time it waited for plus
    all computation so far: ``d_i * word_duration + (t(Write_i) - start)``, ``start``
    being the clock reading when the stream began (the decoder stamps
    ``time.monotonic()``; pass its reading at the start, or rebase the trace to 0).
    ``source_duration = |X| * word_duration``."""
    w = _positive("word_duration", word_duration)
    t0 = _number("start", start)
    hyp = hypothesis_delays(trace)
    if not hyp:
        raise ValueError("trace has no target words: latency is undefined")
    if not trace.source_words:
        raise ValueError("trace has no source words: latency is undefined (|X| = 0)")
    compute = _compute_times(hyp, t0)
    return [d * w + c for (d, _), c in zip(hyp, compute, strict=True)], len(trace.source_words) * w


def _compute_times(hyp: list[tuple[int, float]], start: float) -> list[float]:
    compute = [t - start for _, t in hyp]
    if compute[0] < 0:
        raise ValueError(
            f"the first write is stamped before start ({hyp[0][1]!r} < {start!r}): pass the "
            "clock reading at the start of the stream"
        )
    return compute


def latency_scores(
    trace: Trace,
    reference_length: int | None = None,
    *,
    word_duration: float | None = None,
    start: float = 0.0,
) -> dict[str, float]:
    """AP, AL, LAAL, DAL, ATD and YAAL of one trace, in source words.

    ``|Y|`` is ``reference_length`` when given (SimulEval's default, reference words) and
    the hypothesis length otherwise (SimulEval's ``--no-use-ref-len``). With
    ``word_duration`` (seconds per source word) the computation-aware ``AP_CA`` ...
    ``ATD_CA`` are added, in seconds (AP_CA unit-free), with event times counted from
    ``start`` (see :func:`computation_aware_delays`). ``YAAL`` (``YAAL_CA``) is left
    out when it is undefined (the first word came after the source ended: OmniSTEval
    skips such a sentence), so a mean over sentences is OmniSTEval's."""
    hyp = hypothesis_delays(trace)
    if not hyp:
        raise ValueError(
            "trace has no target words: latency is undefined (SimulEval skips such sentences)"
        )
    x = len(trace.source_words)
    if x == 0:
        raise ValueError("trace has no source words: latency is undefined (|X| = 0)")
    d = [float(di) for di, _ in hyp]
    if reference_length is None:
        y = len(d)
    else:
        if not is_int(reference_length):
            raise TypeError(
                f"reference_length must be an int or None, got {type(reference_length).__name__}"
            )
        y = reference_length
        _positive("reference_length", y)
    scores = {
        "AP": ap(d, x, y),
        "AL": al(d, x, y),
        "LAAL": laal(d, x, y),
        "DAL": dal(d, x),
        "ATD": atd(d),
    }
    if (lag := yaal(d, x, y)) is not None:
        scores["YAAL"] = lag
    if word_duration is not None:
        elapsed, duration = computation_aware_delays(trace, word_duration, start=start)
        compute = _compute_times(hyp, start)
        scores |= {
            "AP_CA": ap(elapsed, duration, y),
            "AL_CA": al(elapsed, duration, y),
            "LAAL_CA": laal(elapsed, duration, y),
            "DAL_CA": dal(elapsed, duration),
            "ATD_CA": atd(d, compute, word_duration=word_duration),
        }
        if (lag := yaal(elapsed, duration, y)) is not None:
            scores["YAAL_CA"] = lag
    return scores
