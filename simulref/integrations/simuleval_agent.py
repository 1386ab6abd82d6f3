"""simulref as a SimulEval 1.1.x text-to-text agent.

Command line (see docs/simuleval.md)::

    simuleval --agent-class simulref.integrations.simuleval_agent.SimulRefAgent \\
        --source src.txt --target ref.txt --k 3 --model smollm2-135m --output out/

How SimulEval 1.1 drives a text agent (``simuleval/evaluator/evaluator.py``): per call,
the instance sends the next source word (``finished=True`` on the last one; once the
source is exhausted, an empty finished segment), the agent's ``policy()`` answers once,
and every word of a write is given the delay ``number of source words sent so far``.

So each ``policy()`` call pushes the words that arrived into a :class:`~simulref.decoder.Feed`
(``last=True`` on the final one) and runs the decoder's stream until it needs a word not
yet sent (``NEED_INPUT``) or finishes. The writes met on the way form one ``WriteAction``
(SimulEval splits its text on whitespace, each word with the same delay); with no write,
``ReadAction``. Running on to ``NEED_INPUT`` rather than stopping at the first write is
what keeps the delays equal: a word written before the next read is reported in the call
that gave the last word read, never in a later call that has already sent one more word.
The decoder (and its KV cache) lives across the calls of one sentence; the model is
loaded once per agent.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

try:
    from simuleval.agents import ReadAction, TextToTextAgent, WriteAction
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "simulref.integrations.simuleval_agent needs SimulEval 1.1.x: "
        "pip install --no-deps 'simuleval>=1.1,<1.2' pandas pyyaml textgrid requests tqdm "
        f"(its declared pytest-flake8 dependency breaks pytest >= 9) ({error})"
    ) from None

from simulref.config import DTYPES, LAYOUTS, DecodeConfig
from simulref.decoder import NEED_INPUT, Feed, engine_name, stream
from simulref.prompt import DEFAULT_SYSTEM
from simulref.trace import Finish, Trace, Write

__all__ = ["SimulRefAgent", "run_simuleval", "source_words"]
# SimulEval's own --dtype / --fp16 (fp16|fp32), honoured when --model-dtype is not given.
_SIMULEVAL_DTYPES = {"fp16": "float16", "fp32": "float32"}


def source_words(segments: Iterable[str]) -> list[str]:
    """The words in SimulEval's ``states.source`` (one word per segment for text input;
    a segment holding several words, e.g. from an upstream agent, is split on whitespace,
    and an empty one adds nothing)."""
    words: list[str] = []
    for i, segment in enumerate(segments):
        if not isinstance(segment, str):
            raise TypeError(f"states.source[{i}]: expected text (a str), got {segment!r}")
        words.extend(segment.split())
    return words


class SimulRefAgent(TextToTextAgent):
    """Wait-k (or any simulref policy: ``policy=``, ``--policy``) with simulref's decoder,
    as a SimulEval text-to-text agent.

    ``SimulRefAgent(model, tokenizer, k=3, ...)`` wraps an already loaded model (what
    :func:`simulref.load` returns, or a test model); SimulEval's command line builds it
    with :meth:`from_args`, which loads ``--model`` once. The keywords are
    :func:`simulref.decoder.stream`'s (``policy`` overrides ``k``, as there; decoding is
    greedy). ``traces`` holds the :class:`~simulref.trace.Trace`
    of every finished sentence in order (``trace``: the last one), equal to what
    :func:`simulref.decoder.translate` gives on the same source, times aside.
    """

    def __init__(self, model, tokenizer, *, k: int = 3, layout: str = "group",
                 system: str = DEFAULT_SYSTEM, target_start: int | str = "auto",
                 max_tokens_per_word: int = 50, policy=None, model_id: str | None = None,
                 args=None):
        if model_id is not None and not isinstance(model_id, str):
            raise TypeError(f"model_id: expected a str or None, got {model_id!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = DecodeConfig(k=k, layout=layout, system=system,
                                   target_start=target_start,
                                   max_tokens_per_word=max_tokens_per_word, policy=policy)
        self.model_id = model_id or str(getattr(model, "model_type", type(model).__name__))
        self.traces: list[Trace] = []
        self._events = None  # the running stream; GenericAgent.__init__ calls reset()
        super().__init__(args)  # reset() starts the first stream
        # The settings translate() records for the same options, so traces compare equal
        # (a Feed is a live source: the engine is the one for a stream).
        self._settings = self.config.settings(self.model_id,
                                              engine=engine_name(self.config, model, False))

    # -- SimulEval's agent interface

    @staticmethod
    def add_args(parser) -> None:
        from simulref.checks import as_option, int_option
        from simulref.limits import parse_target_start

        positive_int, target_start = int_option(minimum=1), as_option(parse_target_start)

        # Names chosen so that SimulEval's own parsers, which see these options before
        # they are added, neither reject them nor take them for an abbreviation
        # (--system would be ambiguous with --system-dir/--system-config, and SimulEval's
        # --dtype only accepts fp16|fp32).
        parser.add_argument("--model", metavar="PRESET|PATH", default=None,
                            help="simulref model preset or a GGUF file / mlx-lm directory "
                                 "(default: simulref's default preset)")
        parser.add_argument("--model-dtype", choices=DTYPES, default=None,
                            help="weights dtype (default: SimulEval's --dtype/--fp16 if "
                                 "given, else float32 on CPU, quantized on a GPU)")
        parser.add_argument("--k", type=positive_int, default=3,
                            help="wait-k: words read before the first write (default: 3)")
        parser.add_argument("--policy", type=_policy_arg, default=None,
                            metavar="POLICY",
                            help="a policy instead of wait-k: wait-k:K, confidence:T"
                                 "[:k_min=K], local-agreement:N[:chunk=C] (docs/policies.md)")
        parser.add_argument("--layout", choices=LAYOUTS, default="group",
                            help="cache layout (default: group)")
        parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM,
                            help=f"the instruction (default: {DEFAULT_SYSTEM!r})")
        parser.add_argument("--target-start", type=target_start, default="auto",
                            metavar="auto|INT",
                            help="first position of the target group (default: auto)")
        parser.add_argument("--max-tokens-per-word", type=positive_int, default=50,
                            metavar="N", help="end a target word after N tokens (default: 50)")

    @classmethod
    def from_args(cls, args) -> SimulRefAgent:
        from simulref import models

        name = args.model or models.DEFAULT_PRESET
        model, tokenizer = models.load(name, model_dtype(args))
        return cls(model, tokenizer, k=args.k, layout=args.layout, system=args.system_prompt,
                   target_start=args.target_start,
                   max_tokens_per_word=args.max_tokens_per_word,
                   policy=getattr(args, "policy", None), model_id=name, args=args)

    def to(self, device: str, *args, **kwargs) -> None:
        """SimulEval's device move: MLX places arrays itself (GPU when there is one)."""

    def reset(self) -> None:
        """A new sentence: a new Feed and a new stream over it (the model stays)."""
        super().reset()
        if self._events is not None:
            self._events.close()
        self._feed = Feed()
        self._sent = 0  # segments of states.source already pushed
        self._log: list = []  # this sentence's events
        self._done = False
        self._events = stream(self.model, self.tokenizer, self._feed, self.config)

    def policy(self):
        if self._done:
            return WriteAction("", finished=True)
        self._push(self.states.source, self.states.source_finished)
        texts = []
        while True:
            event = next(self._events)
            if event is NEED_INPUT:
                break
            self._log.append(event)
            if isinstance(event, Write):
                texts.append(event.text)
            elif isinstance(event, Finish):
                self._done = True
                self.traces.append(Trace(self._settings, self._feed.words, tuple(self._log)))
                return WriteAction("".join(texts).strip(), finished=True)
        if texts:
            return WriteAction("".join(texts).strip(), finished=False)
        return ReadAction()

    # -- helpers

    @property
    def trace(self) -> Trace | None:
        """The trace of the last finished sentence."""
        return self.traces[-1] if self.traces else None

    def _push(self, segments: Sequence[str], finished: bool) -> None:
        new = source_words(segments[self._sent:])
        self._sent = len(segments)
        for i, word in enumerate(new):
            self._feed.push(word, last=finished and i == len(new) - 1)
        if finished:
            # The end of the source: with the last word (the suffix goes with it, as
            # SimulEval's text instances send `finished`), or later on its own.
            self._feed.end()


def _policy_arg(text: str):
    """``--policy``: :func:`simulref.policy.parse_policy`, its error as argparse's."""
    import argparse

    from simulref.policy import parse_policy

    try:
        return parse_policy(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def model_dtype(args) -> str | None:
    """``--model-dtype``, else SimulEval's ``--dtype``/``--fp16``, else None (default)."""
    chosen = getattr(args, "model_dtype", None)
    if chosen is not None:
        return chosen
    if getattr(args, "fp16", False):
        return "float16"
    return _SIMULEVAL_DTYPES.get(getattr(args, "dtype", None))


@contextlib.contextmanager
def _argv(argv: Sequence[str]):
    # SimulEval's parsers read sys.argv behind the caller's back (--user-dir, scorer and
    # dataloader choices); make them see exactly these arguments.
    saved = sys.argv
    sys.argv = [saved[0] if saved else "simuleval", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def run_simuleval(agent, source: str | Path, target: str | Path | None = None, *,
                  output: str | Path | None = None, args: Sequence[str] = ()):
    """Run SimulEval's own sentence-level evaluator on ``agent`` in this process.

    ``source``/``target``: SimulEval's text files (one sentence per line). ``args``: more
    SimulEval options (e.g. ``["--latency-metrics", "AL", "--no-use-ref-len"]``). Returns
    the ``SentenceLevelEvaluator`` after the run: ``.instances`` (predictions, delays),
    ``.latency`` and ``.quality`` (corpus scores, not rounded; ``.results`` rounds them
    to 3 decimals as SimulEval prints them). Scores are printed as the CLI prints them.
    """
    from simuleval import options
    from simuleval.evaluator import build_evaluator

    argv = ["--source", str(source), "--no-progress-bar", *map(str, args)]
    if target is not None:
        argv += ["--target", str(target)]
    if output is not None:
        argv += ["--output", str(output)]
    with _argv(argv):
        parser = options.general_parser()
        options.add_evaluator_args(parser)
        options.add_scorer_args(parser, argv)
        options.add_dataloader_args(parser, argv)
        parsed = parser.parse_args(argv)
    parsed.source_type, parsed.target_type = agent.source_type, agent.target_type
    evaluator = build_evaluator(parsed)
    evaluator(agent)
    return evaluator


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m simulref.integrations.simuleval_agent [SimulEval and agent options]``:
    what ``simuleval --agent-class ...SimulRefAgent`` does (SimulEval's own argument
    parsing, ``from_args`` and sentence-level evaluator), without importing
    ``simuleval.cli``, whose remote-agent service needs ``tornado``."""
    from simuleval.evaluator import build_evaluator
    from simuleval.utils.agent import EVALUATION_SYSTEM_LIST, build_system_args

    with _argv(sys.argv[1:] if argv is None else argv):
        EVALUATION_SYSTEM_LIST.append(SimulRefAgent)
        system, args = build_system_args()
        build_evaluator(args)(system)


if __name__ == "__main__":
    main()
