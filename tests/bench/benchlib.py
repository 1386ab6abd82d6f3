"""Measurement helpers for tests/bench: simulref's decoder and mlx-lm side by side.

Absolute times drift on a shared machine (other jobs come and go within seconds), so
every figure that matters is a ratio of two things measured in lockstep: the runs being
compared are generators advanced alternately by blocks of a few tokens (order reversed
every round), with the streams synchronized after each block, and a ratio is taken per
pair of adjacent blocks. Nothing here assumes a device: the same code runs on CPU, Metal
or CUDA.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

# ---------------------------------------------------------------- statistics (pure)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if len(values) == 0:
        raise ValueError("values: expected at least one value")
    if not 0 <= q <= 100:
        raise ValueError(f"q: expected a percentile in [0, 100], got {q!r}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) on log(x): the exponent p in y ~ c * x**p."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"xs, ys: expected two sequences of the same length >= 2, got "
                         f"{len(xs)} and {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("xs, ys: expected positive values (logarithms)")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mean_x, mean_y = statistics.fmean(lx), statistics.fmean(ly)
    spread = sum((a - mean_x) ** 2 for a in lx)
    if spread == 0:
        raise ValueError("xs: expected at least two different values")
    return sum((a - mean_x) * (b - mean_y) for a, b in zip(lx, ly, strict=True)) / spread


def summary(values: Sequence[float]) -> dict:
    """n, median, p5, p95, mean of ``values`` (empty: n = 0 and None elsewhere)."""
    if len(values) == 0:
        return {"n": 0, "median": None, "p5": None, "p95": None, "mean": None}
    return {"n": len(values), "median": statistics.median(values),
            "p5": percentile(values, 5), "p95": percentile(values, 95),
            "mean": statistics.fmean(values)}


@dataclass(frozen=True)
class Block:
    """One timed stretch of a run: ``tokens`` became known in ``seconds``."""

    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.inf


def paired_ratios(ours: Sequence[Block], theirs: Sequence[Block]) -> list[float]:
    """Per round, our rate over theirs, for rounds in which both made tokens."""
    return [a.rate / b.rate for a, b in zip(ours, theirs, strict=False)
            if a.tokens > 0 and b.tokens > 0 and a.seconds > 0 and b.seconds > 0]


def pooled_rate(blocks: Sequence[Block]) -> float | None:
    tokens = sum(b.tokens for b in blocks)
    seconds = sum(b.seconds for b in blocks)
    return tokens / seconds if tokens and seconds > 0 else None


def read_latencies(read_times: Sequence[float], first_token_times: Sequence[float]
                   ) -> list[float]:
    """For each time a word's first token became known, the time since the latest read
    before it (reads earlier than that one were waiting on the policy, not on compute)."""
    out, reads = [], sorted(read_times)
    j = -1
    for t in sorted(first_token_times):
        while j + 1 < len(reads) and reads[j + 1] <= t:
            j += 1
        if j >= 0:
            out.append(t - reads[j])
    return out


# ---------------------------------------------------------------- hooks and runs (MLX)


def synchronize() -> None:
    """Wait for everything queued on the default stream and on mlx-lm's generation stream."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    mx.synchronize()
    mx.synchronize(generation_stream)


class ForwardClock:
    """``on_forward`` hook: one record per model call, and the time at which each target
    chunk that follows source chunks is evaluated. The decoder reads the token sampled
    from that chunk right away (``.item()``), so evaluating it in the hook adds no work:
    its time is when the first token of the next word is known."""

    def __init__(self):
        self.records: list[tuple[float, str, int, bool, bool]] = []  # t, kind, n, spec., fused
        self.first_token_times: list[float] = []  # time.monotonic(), as the events' t
        self.read_times: list[float] = []  # a source chunk after target tokens was fed
        self._after_source = False

    def __call__(self, forward) -> None:
        import mlx.core as mx

        t = time.monotonic()
        if forward.kind == "source":
            if any(r[1] == "target" for r in self.records):
                self.read_times.append(t)
            self._after_source = True
        elif self._after_source:
            mx.eval(forward.logits)
            t = time.monotonic()
            self.first_token_times.append(t)
            self._after_source = False
        self.records.append((t, forward.kind, int(forward.tokens.shape[0]),
                             bool(forward.speculative), bool(forward.fused)))

    def count(self, kind: str) -> int:
        return sum(1 for r in self.records if r[1] == kind)

    def model_calls(self) -> int:
        """Forwards of the model (a fused read reports two chunks of one call)."""
        return sum(1 for r in self.records if not r[4])

    def tokens(self, kind: str | None = None) -> int:
        return sum(r[2] for r in self.records if kind is None or r[1] == kind)

    def prefill_seconds(self) -> float | None:
        """From the first model call to the first target token known (the first read)."""
        if not self.records or not self.first_token_times:
            return None
        return self.first_token_times[0] - self.records[0][0]


@dataclass
class Side:
    """A run advanced in blocks: ``step()`` pulls one item and updates ``known`` (tokens
    whose value is known to the host) and ``done``."""

    name: str
    known: int = 0
    done: bool = False
    blocks: list[Block] = field(default_factory=list)

    def step(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def advance_to(self, target: int) -> Block:
        start, t0 = self.known, time.perf_counter()
        while not self.done and self.known < target:
            self.step()
        synchronize()  # nothing of this side computes during the next side's block
        block = Block(self.known - start, time.perf_counter() - t0)
        self.blocks.append(block)
        return block

    def close(self) -> None:
        pass


class MlxLmSide(Side):
    """``mlx_lm.stream_generate`` on a token-id prompt: one token per response."""

    def __init__(self, name: str, model, tokenizer, prompt_ids: Sequence[int], max_tokens: int):
        import mlx.core as mx
        from mlx_lm import stream_generate

        super().__init__(name)
        self.prompt_tokens = len(prompt_ids)
        self.tokens: list[int] = []
        self.prompt_tps: float | None = None
        self._gen = stream_generate(model, tokenizer, mx.array(list(prompt_ids)),
                                    max_tokens=max_tokens)

    def step(self) -> None:
        try:
            response = next(self._gen)
        except StopIteration:
            self.done = True
            return
        self.tokens.append(response.token)
        self.prompt_tps = response.prompt_tps
        self.known += 1
        if response.finish_reason is not None:
            self.done = True

    def close(self) -> None:
        self._gen.close()


class DecoderSide(Side):
    """``simulref.stream``: tokens become known a word at a time (a Write comes once the
    token opening the next word, or EOS, is known)."""

    def __init__(self, name: str, events: Iterator, clock: ForwardClock):
        super().__init__(name)
        self.clock = clock
        self.events: list = []
        self.written_tokens = 0
        self._gen = events

    def step(self) -> None:
        from simulref.trace import Finish, Write

        try:
            event = next(self._gen)
        except StopIteration:
            self.done = True
            return
        self.events.append(event)
        if isinstance(event, Write):
            self.written_tokens += len(event.token_ids)
            self.known = self.written_tokens + 1
        elif isinstance(event, Finish):
            self.known = max(self.known, self.written_tokens + 1)
            self.done = True

    def close(self) -> None:
        self._gen.close()

    def written(self) -> list[int]:
        from simulref.trace import Write

        return [t for e in self.events if isinstance(e, Write) for t in e.token_ids]

    def read_times(self) -> list[float]:
        from simulref.trace import Read

        return [e.t for e in self.events if isinstance(e, Read)]

    def n_words(self) -> int:
        from simulref.trace import Write

        return sum(1 for e in self.events if isinstance(e, Write))

    def finish_reason(self) -> str | None:
        from simulref.trace import Finish

        return next((e.reason for e in self.events if isinstance(e, Finish)), None)


def lockstep(sides: Sequence[Side], block: int, until: Callable[[], bool]) -> int:
    """Advance ``sides`` alternately: first each to its first known token (prefill, kept
    as block 0), then rounds of ``block`` more tokens, order reversed every round, until
    ``until()``. Returns the number of rounds after the first."""
    if block < 1:
        raise ValueError(f"block: expected an int >= 1, got {block!r}")
    for side in sides:
        side.advance_to(1)
    rounds = 0
    while not until():
        target = max(s.known for s in sides) + block
        for side in (sides if rounds % 2 == 0 else list(reversed(sides))):
            side.advance_to(target)
        rounds += 1
    for side in sides:
        side.close()
    return rounds


# ---------------------------------------------------------------- one sentence


@dataclass(frozen=True)
class SentenceSettings:
    k: int = 3
    block: int = 8
    extra_words: int = 1  # max_new_words = N + extra_words (bounds a rambling model)
    max_tokens_per_word: int = 16
    system: str | None = None


def prompt_ids(tokenizer, words: Sequence[str], system: str, read: int | None = None
               ) -> list[int]:
    """Token ids the decoder feeds before its first target token: prefix, the first
    ``read`` words (all: with the suffix too) and the assistant header."""
    from simulref.prompt import assemble

    prompt = assemble(tokenizer, list(words), system=system)
    spans = prompt.spans  # prefix, words 1..N, suffix
    end = spans[-1][1] if read is None or read >= len(words) else spans[read][1]
    return list(prompt.ids[:end]) + list(prompt.template.header_ids)


WAITK_ENGINES = ("incremental", "prefilled")  # wait-k on a known source, side by side
LIVE_ENGINES = ("incremental", "fused")  # wait-k on a live source (an iterator)


def measure_sentence(model, tokenizer, words: Sequence[str], settings: SentenceSettings
                     ) -> dict:
    """One sentence: mlx-lm's prefill of the first read, then runs in lockstep: mlx-lm
    offline, simulref offline (k >= N: everything read first, so the same tokens as
    mlx-lm) and simulref wait-k with each engine of :data:`WAITK_ENGINES`."""
    from mlx_lm import stream_generate

    from simulref.decoder import stream
    from simulref.prompt import DEFAULT_SYSTEM

    system = settings.system or DEFAULT_SYSTEM
    n = len(words)
    k = min(settings.k, n)
    max_new_words = n + settings.extra_words

    # mlx-lm's prompt processing of what the decoder's first read feeds (prefix + k words +
    # header); max_tokens=1 stops after the first token.
    first_ids = prompt_ids(tokenizer, words, system, read=k)
    import mlx.core as mx

    responses = list(stream_generate(model, tokenizer, mx.array(first_ids), max_tokens=1))
    first = responses[-1] if responses else None
    synchronize()

    full_ids = prompt_ids(tokenizer, words, system)
    options = dict(system=system, max_new_words=max_new_words,
                   max_tokens_per_word=settings.max_tokens_per_word)
    offline_clock = ForwardClock()
    clocks = {engine: ForwardClock() for engine in WAITK_ENGINES}
    reference = MlxLmSide("mlx-lm", model, tokenizer, full_ids,
                          max_tokens=max_new_words * settings.max_tokens_per_word + 1)
    offline = DecoderSide("offline", stream(model, tokenizer, list(words), k=n + 1,
                                            engine="incremental", on_forward=offline_clock,
                                            **options), offline_clock)
    waitk = {engine: DecoderSide(f"wait-k {engine}",
                                 stream(model, tokenizer, list(words), k=k, engine=engine,
                                        on_forward=clocks[engine], **options), clocks[engine])
             for engine in WAITK_ENGINES}
    sides = (offline, reference, *waitk.values())
    rounds = lockstep(sides, settings.block,
                      until=lambda: offline.done and all(w.done for w in waitk.values()))

    # Block 0 holds the prefill: decode rates use the blocks after it.
    ref_blocks, off_blocks = reference.blocks[1:], offline.blocks[1:]
    same = offline.written() == reference.tokens[: offline.written_tokens]
    ref_step = 1 / pooled_rate(ref_blocks) if pooled_rate(ref_blocks) else None
    off_over = offline_clock.count("target") - offline.written_tokens
    first_read_tokens = len(first_ids)
    first_read_s = clocks["incremental"].prefill_seconds()
    full_s = offline_clock.prefill_seconds()
    row = {
        "words": n,
        "k": k,
        "rounds": rounds,
        "same_tokens": same,
        "offline_tokens": offline.written_tokens,
        "offline_finish": offline.finish_reason(),
        "decode_ratios": paired_ratios(off_blocks, ref_blocks),
        "offline_blocks": [(b.tokens, b.seconds) for b in off_blocks],
        "reference_blocks": [(b.tokens, b.seconds) for b in ref_blocks],
        "reference_step_s": ref_step,
        "offline_target_forwards": offline_clock.count("target"),
        "first_read_tokens": first_read_tokens,
        "first_read_tps": first_read_tokens / first_read_s if first_read_s else None,
        "first_read_tps_mlx_lm": first.prompt_tps if first is not None else None,
        "full_prompt_tokens": len(full_ids),
        "full_prompt_tps": len(full_ids) / full_s if full_s else None,
        "full_prompt_tps_mlx_lm": reference.prompt_tps,
        "engines": {},
    }
    for engine, side in waitk.items():
        clock = clocks[engine]
        latencies = read_latencies(clock.read_times, clock.first_token_times[1:])
        row["engines"][engine] = {
            "waitk_tokens": side.written_tokens,
            "waitk_words": side.n_words(),
            "waitk_finish": side.finish_reason(),
            "waitk_trace": [(type(e).__name__, getattr(e, "token_ids", None))
                            for e in side.events],
            "waitk_ratios": paired_ratios(side.blocks[1:], ref_blocks),
            "waitk_blocks": [(b.tokens, b.seconds) for b in side.blocks[1:]],
            "model_calls": clock.model_calls(),
            "target_forwards": clock.count("target"),
            "source_forwards": clock.count("source"),
            # Target forwards beyond one per written token (header, trailing speculative
            # step), over those of the offline run: re-feeds after reads, dropped steps.
            "extra_target_forwards": clock.count("target") - side.written_tokens - off_over,
            "latencies_s": latencies,
            "latencies_steps": [x / ref_step for x in latencies] if ref_step else [],
        }
    traces = {e: r["waitk_trace"] for e, r in row["engines"].items()}
    row["engines_agree"] = len({repr(t) for t in traces.values()}) == 1
    return row


def _eos_suppressor(eos_ids):
    """An mlx-lm logits processor that never lets EOS win, so that a run generates
    exactly ``max_tokens`` tokens (the same count as the run it is compared with)."""
    import mlx.core as mx

    def process(tokens, logits):
        mask = mx.zeros(logits.shape[-1], dtype=mx.bool_)
        mask[mx.array(sorted(eos_ids))] = True
        return mx.where(mask, -mx.inf, logits)

    return process


def measure_whole_run(model, tokenizer, words: Sequence[str], settings: SentenceSettings,
                      engines: Sequence[str] = WAITK_ENGINES) -> dict:
    """The whole translation, prefill included: ``translate(words, k)`` with each engine
    against ``mlx_lm.stream_generate`` on the full chat prompt making the same number of
    tokens (EOS suppressed), timed alternately (A B B A) so that drift cancels. Ratio =
    mlx-lm's time over ours (the same tokens: a tokens/s ratio)."""
    import mlx.core as mx
    from mlx_lm import stream_generate

    from simulref.decoder import translate
    from simulref.prompt import DEFAULT_SYSTEM

    system = settings.system or DEFAULT_SYSTEM
    n = len(words)
    options = dict(k=min(settings.k, n), system=system, max_new_words=n + settings.extra_words,
                   max_tokens_per_word=settings.max_tokens_per_word)
    full_ids = mx.array(prompt_ids(tokenizer, words, system))
    suppress = _eos_suppressor(tokenizer.eos_token_ids)
    out: dict = {}
    for engine in engines:
        def ours(engine=engine):
            t0 = time.perf_counter()
            trace = translate(model, tokenizer, list(words), engine=engine, **options)
            synchronize()
            return time.perf_counter() - t0, trace

        def theirs(count):
            t0 = time.perf_counter()
            made = sum(1 for _ in stream_generate(model, tokenizer, full_ids, max_tokens=count,
                                                  logits_processors=[suppress]))
            synchronize()
            return time.perf_counter() - t0, made

        a1, trace = ours()
        tokens = sum(len(e.token_ids) for e in trace.writes) + 1  # + the closing EOS
        b1, made1 = theirs(tokens)
        b2, made2 = theirs(tokens)
        a2, _ = ours()
        out[engine] = {"tokens": tokens, "mlx_lm_tokens": made1, "seconds": a1 + a2,
                       "mlx_lm_seconds": b1 + b2,
                       "ratio": (b1 + b2) / (a1 + a2) * tokens / made1 if made1 else None}
    return out


class TimedWords:
    """An iterator over ``words`` that notes when the decoder takes each one (and the
    end): the moment a read starts, before any of its work."""

    def __init__(self, words: Sequence[str]):
        self._words = iter(words)
        self.times: list[float] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        self.times.append(time.monotonic())
        return next(self._words)


def measure_live(model, tokenizer, words: Sequence[str], settings: SentenceSettings,
                 engines: Sequence[str] = LIVE_ENGINES) -> dict:
    """Wait-k over a live source (an iterator, words read as they come) with each engine:
    per read after target tokens, the time from the decoder taking the word from the
    source (before trim, chunk or re-feed) to the first token of the next word (seconds),
    and the model calls per target token written."""
    from simulref.decoder import translate
    from simulref.prompt import DEFAULT_SYSTEM

    system = settings.system or DEFAULT_SYSTEM
    n = len(words)
    out: dict = {}
    traces = {}
    for engine in engines:
        clock = ForwardClock()
        source = TimedWords(words)
        trace = translate(model, tokenizer, source, k=min(settings.k, n), system=system,
                          max_new_words=n + settings.extra_words,
                          max_tokens_per_word=settings.max_tokens_per_word, engine=engine,
                          on_forward=clock)
        traces[engine] = [(type(e).__name__, getattr(e, "token_ids", None))
                          for e in trace.events]
        written = sum(len(e.token_ids) for e in trace.writes)
        out[engine] = {"latencies_s": read_latencies(source.times,
                                                     clock.first_token_times[1:]),
                       "model_calls": clock.model_calls(), "written_tokens": written,
                       "engine_ran": trace.settings.option("engine")}
    out["agree"] = len({repr(t) for t in traces.values()}) == 1
    return out


def aggregate_sentences(rows: Sequence[dict]) -> dict:
    """Corpus figures from :func:`measure_sentence` rows."""
    def pooled(blocks):
        return pooled_rate([Block(t, s) for t, s in blocks])

    def ratios_of(num, den):
        pairs = [r[num] / r[den] for r in rows if r[num] and r[den]]
        return summary(pairs)

    decode = [x for r in rows for x in r["decode_ratios"]]
    off = pooled([b for r in rows for b in r["offline_blocks"]])
    ref = pooled([b for r in rows for b in r["reference_blocks"]])
    engines = {}
    for engine in rows[0]["engines"]:
        per = [r["engines"][engine] for r in rows]
        wk = pooled([b for p in per for b in p["waitk_blocks"]])
        words = sum(p["waitk_words"] for p in per)
        tokens = sum(p["waitk_tokens"] for p in per)
        engines[engine] = {
            "waitk_ratio": summary([x for p in per for x in p["waitk_ratios"]]),
            "waitk_ratio_pooled": wk / ref if wk and ref else None,
            "waitk_tps": wk,
            "extra_target_forwards_per_word": (
                sum(p["extra_target_forwards"] for p in per) / words if words else None),
            # Model calls after the first (the prefill of a known source, the prefix
            # otherwise), per target token written.
            "forwards_per_token": (sum(p["model_calls"] - 1 for p in per) / tokens
                                   if tokens else None),
            "source_forwards_per_word": (
                sum(p["source_forwards"] - 1 for p in per) / words if words else None),
            "latency_steps": summary([x for p in per for x in p["latencies_steps"]]),
        }
    return {
        "sentences": len(rows),
        "same_tokens": sum(1 for r in rows if r["same_tokens"]),
        "engines_agree": sum(1 for r in rows if r["engines_agree"]),
        "decode_ratio": summary(decode),
        "decode_ratio_pooled": off / ref if off and ref else None,
        "decode_tps": off,
        "decode_tps_mlx_lm": ref,
        "engines": engines,
        "first_read_prefill_ratio": ratios_of("first_read_tps", "first_read_tps_mlx_lm"),
        "full_prompt_prefill_ratio": ratios_of("full_prompt_tps", "full_prompt_tps_mlx_lm"),
        "first_read_tps": summary([r["first_read_tps"] for r in rows if r["first_read_tps"]]),
        "first_read_tps_mlx_lm": summary([r["first_read_tps_mlx_lm"] for r in rows
                                          if r["first_read_tps_mlx_lm"]]),
    }


def aggregate_whole_runs(rows: Sequence[dict]) -> dict:
    """Per engine: the whole-run ratio over all sentences (pooled: all mlx-lm time over
    all of ours, token-weighted) and per sentence (median, p5-p95)."""
    out = {}
    for engine in rows[0]:
        per = [r[engine] for r in rows]
        ours = sum(p["seconds"] for p in per)
        theirs = sum(p["mlx_lm_seconds"] * p["tokens"] / p["mlx_lm_tokens"] for p in per)
        out[engine] = {"ratio_pooled": theirs / ours if ours else None,
                       "ratio": summary([p["ratio"] for p in per if p["ratio"]]),
                       "tokens": sum(p["tokens"] for p in per)}
    return out


def aggregate_live(rows: Sequence[dict], step_s: Sequence[float | None]) -> dict:
    """Per engine: read -> first token of the next word, in mlx-lm decode steps of the same
    sentence, and model calls per target token written (the prefix call excluded)."""
    out = {"agree": sum(1 for r in rows if r["agree"]), "sentences": len(rows)}
    for engine in (e for e in rows[0] if e != "agree"):
        steps = [x / step for r, step in zip(rows, step_s, strict=True) if step
                 for x in r[engine]["latencies_s"]]
        tokens = sum(r[engine]["written_tokens"] for r in rows)
        out[engine] = {
            "latency_steps": summary(steps),
            "latency_s": summary([x for r in rows for x in r[engine]["latencies_s"]]),
            "forwards_per_token": (sum(r[engine]["model_calls"] - 1 for r in rows) / tokens
                                   if tokens else None),
            "engine_ran": sorted({r[engine]["engine_ran"] for r in rows}),
        }
    return out


# ---------------------------------------------------------------- scaling with length


class ReadProgress(DecoderSide):
    """A decoder run whose progress is the number of source words read."""

    def step(self) -> None:
        from simulref.trace import Read

        super().step()
        self.known = sum(1 for e in self.events if isinstance(e, Read))


def measure_lengths(model, tokenizer, words: Sequence[str], layouts: Sequence[str], k: int,
                    max_tokens_per_word: int, reads_per_block: int = 4) -> list[dict]:
    """Wait-k runs over ``words``, one per layout, in lockstep by source words read (so
    drift hits every layout alike), each with enough target words for every source word to
    be read (``N - k + 1``): time, model calls and tokens fed per layout."""
    from simulref.decoder import stream

    n = len(words)
    clocks = {layout: ForwardClock() for layout in layouts}
    sides = [ReadProgress(layout, stream(model, tokenizer, list(words), k=k, layout=layout,
                                         max_new_words=max(1, n - k + 1),
                                         max_tokens_per_word=max_tokens_per_word,
                                         on_forward=clocks[layout]), clocks[layout])
             for layout in layouts]
    synchronize()
    lockstep(sides, reads_per_block, until=lambda: all(s.done for s in sides))
    return [{"words": n, "layout": side.name, "seconds": sum(b.seconds for b in side.blocks),
             "forwards": len(side.clock.records), "tokens_fed": side.clock.tokens(),
             "target_words": side.n_words(), "finish": side.finish_reason()}
            for side in sides]


def scaling_summary(rows: Sequence[dict]) -> dict:
    """Exponents of time and of tokens fed against source length, per layout (fitted over
    every length, and locally between the two longest), and reencode/group at the longest."""
    out: dict = {"runs": list(rows)}
    by_layout: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_layout.setdefault(row["layout"], {})[row["words"]] = row
    for layout, runs in by_layout.items():
        ns = sorted(runs)
        secs = [runs[n]["seconds"] for n in ns]
        fed = [runs[n]["tokens_fed"] for n in ns]
        out[layout] = {
            "time_exponent": loglog_slope(ns, secs),
            "time_exponent_last": loglog_slope(ns[-2:], secs[-2:]),
            "tokens_fed_exponent": loglog_slope(ns, fed),
        }
    if {"group", "reencode"} <= by_layout.keys():
        common = sorted(by_layout["group"].keys() & by_layout["reencode"].keys())
        longest = common[-1]
        out["longest"] = longest
        out["reencode_over_group_time"] = (by_layout["reencode"][longest]["seconds"]
                                           / by_layout["group"][longest]["seconds"])
        out["reencode_over_group_tokens_fed"] = (
            by_layout["reencode"][longest]["tokens_fed"]
            / by_layout["group"][longest]["tokens_fed"])
    return out
