"""``watch --longform`` and ``translate --longform``: an endless stream, sentence by
sentence (:mod:`simulref.longform`).

Long-form is a flag, not the default for ``-``: a live stdin without it is still one
sentence (one trace, the metrics of one instance), as before. ``--save`` appends each
finished sentence as a trace of its own (JSON Lines, readable by ``simulref trace`` and
:func:`simulref.trace.read_traces`) as soon as the next sentence starts, flushed and
synced, so a crash, a kill or Ctrl-C loses at most the sentence in flight. Each
sentence's settings carry ``sentence``, ``source_start`` and ``target_index`` (stream
indices of its first source and target words) in ``extra``; its events keep the stream's indices.
"""

from __future__ import annotations

import os
import sys
import time

from simulref.cli.args import (
    EXIT_INTERRUPTED,
    UsageError,
    decode_config,
    model_name,
    rebase_times,
)


def check_options(args) -> None:
    """The decode options a long-form run refuses (simulref.longform.check_config), as
    usage errors before the model loads."""
    from simulref.longform import check_config

    try:
        check_config(decode_config(args))
    except ValueError as error:
        names, _, rest = str(error).partition(":")
        options = ", ".join("--" + n.strip().replace("_", "-") for n in names.split(","))
        raise UsageError(f"{options}:{rest}") from None


def check_longform(args, model) -> None:
    """Usage errors of the long-form options, before anything is decoded."""
    from simulref.limits import context_length

    context = context_length(model)
    if args.context_budget >= context // 2:
        raise UsageError(f"--context-budget: {args.context_budget} tokens leave no room in "
                         f"the model's context of {context} (use at most {context // 2 - 1}"
                         f": a sentence pair may come on top of the budget)")


def session(args, source, model, tokenizer):
    from simulref.longform import Longform

    try:
        return Longform(model, tokenizer, source, decode_config(args),
                        context_budget=args.context_budget, eviction=args.eviction,
                        turns=not args.one_turn, max_history=args.max_history)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


class SentenceLog:
    """Collects a long-form run's events; each finished sentence becomes a Trace, handed
    to ``sink(trace)`` as soon as the event after its SentenceDone arrives (the last
    one with the run's Finish)."""

    def __init__(self, run, model_id: str, sink, t0: float | None = None):
        self.t0 = time.monotonic() if t0 is None else t0  # times are saved from here
        self.run = run
        self.model_id = model_id
        self.sink = sink
        self.events: list = []
        self.done = None  # a SentenceDone waiting for the event after it

    def __call__(self, event) -> None:
        from simulref.longform import Evicted, SentenceDone
        from simulref.trace import Finish

        if isinstance(event, SentenceDone):
            self.done = event
            return
        if isinstance(event, Evicted):
            return
        if self.done is not None:
            if isinstance(event, Finish):  # the last sentence ends with the run's Finish
                self.events.append(event)
                self.flush()
                return
            self.flush()
        self.events.append(event)

    def flush(self) -> None:
        from dataclasses import replace

        from simulref.trace import Trace

        done, self.done = self.done, None
        if done is None:
            return
        settings = self.run.settings(self.model_id)
        extra = dict(settings.extra) | dict(sentence=done.index, source_start=done.source_start,
                                            target_index=done.target_start)
        trace = Trace(replace(settings, extra=extra), done.source_words, tuple(self.events))
        self.events = []
        self.sink(rebase_times(trace, self.t0))


def appender(path: str):
    """A sink that appends each trace to ``path`` (emptied first), flushed and synced."""
    handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def sink(trace) -> None:
        handle.write(trace.to_jsonl())
        handle.flush()
        os.fsync(handle.fileno())

    sink.close = handle.close
    return sink


def _pair_text(done) -> str:
    return f"[{done.index}] {done.source}\n    → {done.target}\n"


def run_watch(args, source, model, tokenizer, collect) -> int:
    """The long-form watch: a terminal shows the last finished pairs and the sentence in
    progress, scrolling sentence by sentence; elsewhere each pair is printed when it
    is finished. ``collect``: translate's event drain (Ctrl-C handling), passed in so
    that this module does not import the subcommands that import it."""
    from simulref.cli.output import stdout_console
    from simulref.longform import SentenceDone
    from simulref.trace import Read, Write

    if args.mode != "live":
        raise UsageError("--mode: --longform has its own view (use the default, live)")
    check_longform(args, model)
    run = session(args, source, model, tokenizer)
    sink = appender(args.save) if args.save is not None else None
    log = SentenceLog(run, model_name(args.model), sink) if sink else None
    console = stdout_console()
    finished: list = []
    current: dict = {"source": [], "target": []}

    def track(event) -> None:
        if log is not None:
            log(event)
        if isinstance(event, SentenceDone):
            finished.append(event)
            current["source"], current["target"] = [], []
            if not console.is_terminal:
                sys.stdout.write(_pair_text(event))
                sys.stdout.flush()
        elif isinstance(event, Read):
            current["source"].append(event.word)
        elif isinstance(event, Write):
            current["target"].append(event.word)

    def frame():
        from rich.text import Text

        text = Text()
        for done in finished[-6:]:
            text.append(_pair_text(done))
        text.append(" ".join(current["source"]) + "\n", style="bold")
        text.append("    → " + " ".join(current["target"]))
        return text

    try:
        if console.is_terminal:
            from rich.live import Live

            with Live(get_renderable=frame, console=console, refresh_per_second=8,
                      redirect_stdout=False, redirect_stderr=False) as live:
                def on_event(event) -> None:
                    track(event)
                    live.refresh()

                _, interrupted = collect(run.events(), on_event)
        else:
            _, interrupted = collect(run.events(), track)
    finally:
        if sink is not None:
            sink.close()
    return EXIT_INTERRUPTED if interrupted else 0


def run_translate(args, source, model, tokenizer, collect) -> int:
    """The long-form translate: target words as they are written, a new line at each
    finished sentence; ``--json``: each finished sentence's trace as JSON Lines as soon
    as it is finished; ``--trace``: each sentence's compact trace at the end."""
    from simulref.longform import SentenceDone
    from simulref.trace import Write, render_compact

    check_longform(args, model)
    run = session(args, source, model, tokenizer)
    out = sys.stdout
    traces: list = []

    def sink(trace) -> None:
        traces.append(trace)
        if args.json:
            out.write(trace.to_jsonl())
            out.flush()

    log = SentenceLog(run, model_name(args.model), sink)
    line = [0]

    def show(event) -> None:
        log(event)
        if args.json:
            return
        if isinstance(event, Write):
            out.write((" " if line[0] else "") + event.word)
            out.flush()
            line[0] += 1
        elif isinstance(event, SentenceDone):
            out.write("\n")
            out.flush()
            line[0] = 0

    _, interrupted = collect(run.events(), show)
    if args.trace:
        out.write("".join(render_compact(t) + "\n" for t in traces))
    out.flush()
    return EXIT_INTERRUPTED if interrupted else 0
