"""DecodeConfig: the one home of the decode options (no MLX import).

``stream``, ``translate``, the command line, ``evaluate`` and the SimulEval agent all build
a :class:`DecodeConfig`; it is checked once, when it is made, and it produces the
trace's :class:`~simulref.trace.Settings`. The names the options can take (layouts,
engines, dtypes) live here once too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from .checks import check_int
from .prompt import DEFAULT_SYSTEM, _check_system

LAYOUTS = ("group", "interleaved", "reencode")
# "auto" picks the fastest engine that applies (docs/decoder.md, "Engines").
ENGINES = ("auto", "incremental", "prefilled", "fused", "reencode")
DTYPES = ("float32", "bfloat16", "float16", "quantized")


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode: policy (or wait-k's ``k``), cache layout, instruction, target start,
    limits, EOS handling, chat format, sampler and engine. See docs/decoder.md for each.

    ``policy`` (any object with ``decide(read, written, source_done, source_length)``)
    overrides ``k``. ``layout="reencode"`` is the re-encoding baseline (engine
    ``reencode``). ``engine="auto"``: in the group layout, ``prefilled`` for a source
    known up front and ``fused`` for a live one; ``incremental`` otherwise.
    """

    k: int = 3
    system: str = DEFAULT_SYSTEM
    layout: str = "group"
    target_start: int | str = "auto"
    max_tokens_per_word: int = 50
    max_new_words: int | None = None
    stop_at_first_eos: bool = False
    policy: object = None
    sampler: Callable | None = None
    chat_format: object = None
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.policy is None:
            check_int("k", self.k, minimum=1)
        elif not callable(getattr(self.policy, "decide", None)):
            raise TypeError(f"policy: expected an object with a decide() method, "
                            f"got {self.policy!r}")
        _check_system(self.system)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        if self.target_start != "auto":
            ts = self.target_start
            if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
                raise ValueError(f"target_start: expected 'auto' or an int >= 0, got {ts!r}")
            if self.layout != "group":
                raise ValueError(f"target_start: an explicit start applies to the 'group' "
                                 f"layout only, got target_start={ts!r} with "
                                 f"layout={self.layout!r}")
        check_int("max_tokens_per_word", self.max_tokens_per_word, minimum=1)
        check_int("max_new_words", self.max_new_words, minimum=0, none_ok=True)
        if not isinstance(self.stop_at_first_eos, bool):
            raise TypeError(f"stop_at_first_eos: expected a bool, got {self.stop_at_first_eos!r}")
        if self.sampler is not None and not callable(self.sampler):
            raise TypeError(f"sampler: expected a callable (mlx_lm.sample_utils.make_sampler), "
                            f"got {self.sampler!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine: expected one of {ENGINES}, got {self.engine!r}")
        if (self.engine == "reencode") != (self.layout == "reencode") and self.engine != "auto":
            raise ValueError(f"engine: {self.engine!r} does not go with layout="
                             f"{self.layout!r} (the reencode baseline is layout='reencode')")
        if self.engine in ("prefilled", "fused") and self.layout != "group":
            raise ValueError(f"engine: {self.engine!r} needs the 'group' layout, got "
                             f"layout={self.layout!r}")

    @classmethod
    def of(cls, config: DecodeConfig | None = None, **options) -> DecodeConfig:
        """``config`` with ``options`` replaced, or a new one from ``options``; an unknown
        option name is a TypeError naming it."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unexpected decode option(s) {', '.join(unknown)}; expected "
                            f"some of {', '.join(sorted(names))}")
        if config is None:
            return cls(**options)
        if not isinstance(config, DecodeConfig):
            raise TypeError(f"config: expected a DecodeConfig, got {config!r}")
        return replace(config, **options) if options else config

    def the_policy(self):
        """The policy object: ``policy``, or ``WaitK(k)``."""
        from .policy import WaitK

        return WaitK(self.k) if self.policy is None else self.policy

    def engine_for(self, known_source: bool) -> str:
        """The engine that runs for a source known up front or not."""
        if self.layout == "reencode":
            return "reencode"
        if self.engine != "auto":
            return self.engine
        if self.layout != "group":
            return "incremental"
        return "prefilled" if known_source else "fused"

    def check_source(self, known_source: bool) -> None:
        """Refuse an engine asked for by name that cannot run this kind of source, before
        any model loads: ``prefilled`` needs a source known up front, ``fused`` a live
        one (the rule: refused, never swapped for another engine; ``auto`` picks the one
        that fits). ValueError naming the engine."""
        if self.engine == "prefilled" and not known_source:
            raise ValueError("engine: 'prefilled' needs a source known up front (TEXT, a "
                             "file on stdin, a str or a list), got a live stream; use "
                             "'auto', 'fused' or 'incremental'")
        if self.engine == "fused" and known_source:
            raise ValueError("engine: 'fused' needs a live source (a stream: stdin from a "
                             "pipe, watch, an iterator or a Feed), got one known up front; "
                             "use 'auto', 'prefilled' or 'incremental'")

    @property
    def sampler_label(self) -> str:
        if self.sampler is None:
            return "greedy"
        return "greedy" if is_greedy(self.sampler) else "custom"

    def settings(self, model: str, *, engine: str | None = None, **extra):
        """The trace's :class:`~simulref.trace.Settings` for a run of this config on
        ``model`` (``engine``: the one that ran; ``extra``: more options to record)."""
        from .policy import WaitK
        from .trace import Settings

        policy = self.the_policy()
        recorded = {"policy": str(getattr(policy, "name", type(policy).__name__)),
                    "sampler": self.sampler_label}
        if engine is not None:
            recorded["engine"] = engine
        recorded.update(extra)
        return Settings(
            model=model, k=policy.k if isinstance(policy, WaitK) else None,
            layout=self.layout, system=self.system, target_start=self.target_start,
            max_tokens_per_word=self.max_tokens_per_word, max_new_words=self.max_new_words,
            stop_at_first_eos=self.stop_at_first_eos, extra=recorded)


def is_greedy(sampler) -> bool:
    """Whether ``sampler`` is argmax: None, or mlx-lm's greedy sampler (one function
    object, ``make_sampler(temp=0.0)``). A sampler can only be that object once mlx-lm's
    sample_utils is imported, so it is looked up there rather than imported: this module
    stays MLX-free."""
    if sampler is None:
        return True
    sample_utils = sys.modules.get("mlx_lm.sample_utils")
    return sample_utils is not None and sampler is sample_utils.make_sampler(temp=0.0)
