"""The decoder's entry points: ``stream(model, tokenizer, source, ...)`` yields
:mod:`simulref.trace` events as it goes, ``translate(...)`` collects them into a
:class:`~simulref.trace.Trace`; the engine for a config (``engine_name``) and the run that
drives it (``_make_run``: the word-by-word loop of :mod:`simulref.loop`, or
LocalAgreement's of :mod:`simulref.agreement`). See docs/decoder.md.

The loop, the source (``Feed``, ``NEED_INPUT``) and the token tables live in
:mod:`simulref.loop` and are re-exported here, so that this module sits above both
loops: :mod:`simulref.agreement` builds on :mod:`simulref.loop`, never on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .config import ENGINES, LAYOUTS, DecodeConfig  # noqa: F401 - re-exported
from .engine import (
    FusedEngine,
    IncrementalEngine,
    PrefilledEngine,
    ReencodeEngine,
    supports_row_offsets,
)
from .limits import context_length
from .loop import (  # noqa: F401 - re-exported
    CONTEXT_LIMIT,
    EMPTY_SOURCE,
    NEED_INPUT,
    PENDING,
    Feed,
    TokenTable,
    _Run,
    _Source,
    token_table,
)
from .policy import is_agreement
from .prompt import template_for
from .trace import Read, Trace


def known_prompt(template, word_ids, length: int) -> tuple[list[tuple[int, ...]], int]:
    """A known source's words as an engine that prefills it takes them (the last with
    the end-of-turn suffix) and the whole prompt's length, assistant header included."""
    words = [tuple(word_ids[i]) for i in range(length)]
    if words:
        words[-1] = words[-1] + tuple(template.suffix_ids)
    prompt = len(template.prefix_ids) + sum(map(len, words)) + len(template.header_ids)
    return words, prompt


def _make_engine(config: DecodeConfig, model, template, source: _Source, word_ids,
                 on_forward, context: int):
    name = engine_name(config, model, source.length is not None)
    common = dict(target_start=config.target_start, sampler=config.sampler,
                  on_forward=on_forward)
    if name == "prefilled":
        if source.length is None:
            raise ValueError("engine: 'prefilled' needs a source known up front (a str or a "
                             "sequence of words), got a stream; use 'auto' or 'incremental'")
        words, prompt = known_prompt(template, word_ids, source.length)
        if prompt < context:
            return PrefilledEngine(model, template, words, **common)
        if config.engine == "prefilled":
            raise ValueError(f"engine: 'prefilled' needs the whole prompt ({prompt} tokens) "
                             f"inside the model's context of {context} tokens")
        name = "incremental"  # it reads what fits, then stops at the context limit
    if name == "fused":
        if source.length is not None:
            raise ValueError("engine: 'fused' is for a live source (an iterator or a Feed); "
                             "a source known up front runs with 'prefilled'")
        return FusedEngine(model, template, **common)
    if name == "reencode":
        return ReencodeEngine(model, template, known_source=source.length is not None,
                              **common)
    return IncrementalEngine(model, template, layout=config.layout,
                             known_source=source.length is not None, **common)


def engine_name(config: DecodeConfig, model, known_source: bool) -> str:
    """The engine that runs ``config`` on ``model`` for a source known up front or not: a
    model whose attention cannot take one RoPE offset per row falls back from ``fused``
    to ``incremental`` (the trace's settings record the engine that ran). LocalAgreement
    runs its own engine: ``draft`` (the fast path) or ``incremental`` (its twin)."""
    if is_agreement(config.the_policy()):
        from .agreement import FAST, TWIN

        return FAST if config.engine == "auto" else TWIN
    name = config.engine_for(known_source)
    if name == "fused" and config.engine == "auto" and not supports_row_offsets(model):
        return "incremental"
    return name


def _make_run(model, tokenizer, source, config: DecodeConfig, on_forward=None, *,
              make_engine=None, template=None) -> _Run:
    """The loop over ``source``; ``make_engine(template, words, word_ids, context)``
    (simulref.batch) replaces the engine choice, ``template`` the template lookup."""
    if on_forward is not None and not callable(on_forward):
        raise TypeError(f"on_forward: expected a callable or None, got {on_forward!r}")
    if template is None:
        template = template_for(tokenizer, system=config.system,
                                chat_format=config.chat_format)
    words = _Source(source)
    # A known source is checked (and tokenized) up front, so that a bad word raises here
    # rather than halfway through the stream.
    word_ids = ({} if words.length is None else
                {i: tuple(template.word_ids(i, w)) for i, w in enumerate(words.known)})
    context = context_length(model)
    if is_agreement(config.the_policy()):
        if make_engine is not None:
            raise ValueError("policy: LocalAgreement does not run in a batch yet; decode "
                             "it one sentence at a time")
        from .agreement import make_agreement_run

        return make_agreement_run(config, model, template, words, word_ids,
                                  config.the_policy(), token_table(tokenizer),
                                  frozenset(tokenizer.eos_token_ids), on_forward, context)
    if make_engine is None:
        engine = _make_engine(config, model, template, words, word_ids, on_forward, context)
    else:
        engine = make_engine(template, words, word_ids, context)
    policy = config.the_policy()
    if getattr(policy, "observes", False):
        if not callable(getattr(engine, "observe", None)):
            raise ValueError(f"policy: {policy!r} looks at the model, which a batched row "
                             "does not support yet; decode it one sentence at a time")
        engine.observe()
    return _Run(engine, template, words, word_ids, policy, token_table(tokenizer),
                frozenset(tokenizer.eos_token_ids), config.max_tokens_per_word,
                config.max_new_words, config.stop_at_first_eos, context)


def stream(model, tokenizer, source, config: DecodeConfig | None = None, *,
           on_forward: Callable | None = None, **options) -> Iterator:
    """Translate ``source`` simultaneously, yielding Read / Write / DroppedEos / BlankRun /
    Finish events as they happen.

    ``source``: a str (split on whitespace), a sequence of words, any iterable of words
    (it may block while the speaker is silent; the source is complete only when it is
    exhausted), or a :class:`Feed`, over which the stream yields :data:`NEED_INPUT` when
    it wants a word not yet pushed. The decode options are a
    :class:`~simulref.config.DecodeConfig` (``config``) or its fields as keywords (``k``,
    ``system``, ``layout``, ``target_start``, ``max_tokens_per_word``, ``max_new_words``,
    ``stop_at_first_eos``, ``policy``, ``sampler``, ``chat_format``, ``engine``); keywords
    given with ``config`` replace its fields. ``on_forward``: debugging hook called with a
    :class:`~simulref.engine.Forward` per model call.

    Arguments are checked when ``stream`` is called, not on the first ``next()``.
    """
    run = _make_run(model, tokenizer, source, DecodeConfig.of(config, **options), on_forward)
    return run.events()


def _model_name(model, model_id) -> str:
    if model_id is not None:
        if not isinstance(model_id, str):
            raise TypeError(f"model_id: expected a str or None, got {model_id!r}")
        return model_id
    return str(getattr(model, "model_type", type(model).__name__))


def translate(model, tokenizer, source, config: DecodeConfig | None = None, *,
              model_id: str | None = None, on_forward: Callable | None = None,
              **options) -> Trace:
    """Run :func:`stream` to the end and return the :class:`~simulref.trace.Trace`.

    ``model_id`` names the model in the trace's settings (default: its ``model_type``).
    A :class:`Feed` must be complete (its last word pushed, or ``end()`` called).
    """
    if isinstance(source, Feed) and not source.complete:
        raise ValueError("source: translate() needs a complete Feed (push the final word "
                         "with last=True or call end()); use stream() to feed words as "
                         "they come")
    config = DecodeConfig.of(config, **options)
    name = _model_name(model, model_id)
    run = _make_run(model, tokenizer, source, config, on_forward)
    events = tuple(run.events())
    return Trace(config.settings(name, engine=run.engine.name), source_words(run, events),
                 events)


def source_words(run: _Run, events) -> tuple[str, ...]:
    """|X| for the metrics: the whole source when it is known up front, also when the
    model stopped before reading all of it; for a stream, the words that arrived."""
    if run.source.known is not None:
        return tuple(run.source.known)
    return tuple(e.word for e in events if isinstance(e, Read))
