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
        self.records: list[tuple[float, str, int, bool]] = []  # (t, kind, tokens, spec.)
        self.first_token_times: list[float] = []  # time.monotonic(), as the events' t
        self._after_source = False

    def __call__(self, forward) -> None:
        import mlx.core as mx

        t = time.monotonic()
        if forward.kind == "source":
            self._after_source = True
        elif self._after_source:
            mx.eval(forward.logits)
            t = time.monotonic()
            self.first_token_times.append(t)
            self._after_source = False
        self.records.append((t, forward.kind, int(forward.tokens.shape[0]),
                             bool(forward.speculative)))

    def count(self, kind: str) -> int:
        return sum(1 for r in self.records if r[1] == kind)

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


def measure_sentence(model, tokenizer, words: Sequence[str], settings: SentenceSettings
                     ) -> dict:
    """One sentence: mlx-lm's prefill of the first read, then three runs in lockstep:
    mlx-lm offline, simulref offline (k >= N: everything read first, so the same tokens
    as mlx-lm) and simulref wait-k."""
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
    offline_clock, waitk_clock = ForwardClock(), ForwardClock()
    reference = MlxLmSide("mlx-lm", model, tokenizer, full_ids,
                          max_tokens=max_new_words * settings.max_tokens_per_word + 1)
    offline = DecoderSide("offline", stream(model, tokenizer, list(words), k=n + 1,
                                            on_forward=offline_clock, **options),
                          offline_clock)
    waitk = DecoderSide("wait-k", stream(model, tokenizer, list(words), k=k,
                                         on_forward=waitk_clock, **options), waitk_clock)
    sides = (offline, reference, waitk)
    rounds = lockstep(sides, settings.block, until=lambda: offline.done and waitk.done)

    # Block 0 holds the prefill: decode rates use the blocks after it.
    ref_blocks, off_blocks, wk_blocks = reference.blocks[1:], offline.blocks[1:], waitk.blocks[1:]
    same = offline.written() == reference.tokens[: offline.written_tokens]
    ref_step = 1 / pooled_rate(ref_blocks) if pooled_rate(ref_blocks) else None
    latencies = read_latencies(waitk.read_times(), waitk_clock.first_token_times[1:])
    # Target forwards beyond one per written token (header, trailing speculative step),
    # over those of the offline run: re-feeds after reads and dropped speculative steps.
    wk_over = waitk_clock.count("target") - waitk.written_tokens
    off_over = offline_clock.count("target") - offline.written_tokens
    first_read_tokens = len(first_ids)
    first_read_s = waitk_clock.prefill_seconds()
    full_s = offline_clock.prefill_seconds()
    return {
        "words": n,
        "k": k,
        "rounds": rounds,
        "same_tokens": same,
        "offline_tokens": offline.written_tokens,
        "offline_finish": offline.finish_reason(),
        "waitk_tokens": waitk.written_tokens,
        "waitk_words": waitk.n_words(),
        "waitk_finish": waitk.finish_reason(),
        "decode_ratios": paired_ratios(off_blocks, ref_blocks),
        "waitk_ratios": paired_ratios(wk_blocks, ref_blocks),
        "offline_blocks": [(b.tokens, b.seconds) for b in off_blocks],
        "reference_blocks": [(b.tokens, b.seconds) for b in ref_blocks],
        "waitk_blocks": [(b.tokens, b.seconds) for b in wk_blocks],
        "reference_step_s": ref_step,
        "latencies_s": latencies,
        "latencies_steps": [x / ref_step for x in latencies] if ref_step else [],
        "waitk_target_forwards": waitk_clock.count("target"),
        "waitk_source_forwards": waitk_clock.count("source"),
        "offline_target_forwards": offline_clock.count("target"),
        "extra_target_forwards": wk_over - off_over,
        "first_read_tokens": first_read_tokens,
        "first_read_tps": first_read_tokens / first_read_s if first_read_s else None,
        "first_read_tps_mlx_lm": first.prompt_tps if first is not None else None,
        "full_prompt_tokens": len(full_ids),
        "full_prompt_tps": len(full_ids) / full_s if full_s else None,
        "full_prompt_tps_mlx_lm": reference.prompt_tps,
    }


def aggregate_sentences(rows: Sequence[dict]) -> dict:
    """Corpus figures from :func:`measure_sentence` rows."""
    def pooled(key):
        return pooled_rate([Block(t, s) for r in rows for t, s in r[key]])

    def ratios_of(num, den):
        pairs = [r[num] / r[den] for r in rows if r[num] and r[den]]
        return summary(pairs)

    decode = [x for r in rows for x in r["decode_ratios"]]
    waitk = [x for r in rows for x in r["waitk_ratios"]]
    off, ref, wk = pooled("offline_blocks"), pooled("reference_blocks"), pooled("waitk_blocks")
    words = sum(r["waitk_words"] for r in rows)
    return {
        "sentences": len(rows),
        "same_tokens": sum(1 for r in rows if r["same_tokens"]),
        "decode_ratio": summary(decode),
        "decode_ratio_pooled": off / ref if off and ref else None,
        "decode_tps": off,
        "decode_tps_mlx_lm": ref,
        "waitk_ratio": summary(waitk),
        "waitk_ratio_pooled": wk / ref if wk and ref else None,
        "waitk_tps": wk,
        "extra_target_forwards_per_word": (
            sum(r["extra_target_forwards"] for r in rows) / words if words else None),
        # Source chunks past the prefix (one per read word), per target word written.
        "source_forwards_per_word": (
            sum(r["waitk_source_forwards"] - 1 for r in rows) / words if words else None),
        "latency_steps": summary([x for r in rows for x in r["latencies_steps"]]),
        "latency_s": summary([x for r in rows for x in r["latencies_s"]]),
        "first_read_prefill_ratio": ratios_of("first_read_tps", "first_read_tps_mlx_lm"),
        "full_prompt_prefill_ratio": ratios_of("full_prompt_tps", "full_prompt_tps_mlx_lm"),
        "first_read_tps": summary([r["first_read_tps"] for r in rows if r["first_read_tps"]]),
        "first_read_tps_mlx_lm": summary([r["first_read_tps_mlx_lm"] for r in rows
                                          if r["first_read_tps_mlx_lm"]]),
    }


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
