"""Will a translation fit in the model's context? Checked up front, before decoding.

A model is trained on sequences of at most ``context_length(model)`` tokens (mlx-lm's
``args.max_position_embeddings``, from ``config.json`` or a GGUF file's
``<arch>.context_length``); past it RoPE positions and attention spans are out of what it
has seen. A known source is refused when its run cannot fit:

    prompt tokens (system turn + every source word + end of turn + assistant header)
    + at least one token per target word up to the run's word guard

The word guard is the decoder's ``max_new_words``, by default ``2 N + 10`` words for N
source words (:func:`guard_words`, the same rule as ``simulref.decoder``). One token per
word is the least a word can take, so the estimate is a lower bound: a refused source
*cannot* reach its own guard inside the context. A source that passes may still run out
if the model writes long words; ending such a stream is the decoder's job.

An explicit ``target_start`` (group layout) puts the target group's positions at
``target_start, target_start + 1, ...``: those must stay inside the context too.

Training (:func:`check_examples_fit`) makes the same check with what a training pair
feeds, known exactly: its source tokens (prompt) and its target tokens (assistant header
+ reference); ``simulref train`` and ``simulref translate`` refuse the same things.

Pure, except :func:`context_length`, which reads attributes of a model object.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulref.checks import check_int, parse_int

# Positions are int32 in MLX's kernels: a larger --target-start cannot even be passed on
# (2**63 ended in ``std::bad_cast``). Checked without a model; the context check follows.
MAX_POSITION = 2**31 - 1
# Used when a model declares no context length: the smallest context of the common chat
# models (Llama 1, SmolLM 1). Conservative, and said in the message when it applies.
FALLBACK_CONTEXT = 2048
# Where mlx-lm model args keep the context length, by architecture family.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "max_seq_len", "n_ctx", "context_length",
                      "seq_length")


def parse_target_start(text: str) -> int | str:
    """A target start written as text: ``'auto'`` or a position in ``[0, MAX_POSITION]``
    (ValueError otherwise; the model's own context is checked once it is loaded)."""
    if text == "auto":
        return "auto"
    try:
        return parse_int(text, minimum=0, maximum=MAX_POSITION)
    except ValueError:
        raise ValueError(f"expected 'auto' or an integer in [0, {MAX_POSITION}], "
                         f"got {text!r}") from None


class ContextError(ValueError):
    """A run that cannot fit in the model's context. ``argument`` names what to change:
    ``"source"`` or ``"target_start"`` (training: ``"pairs"`` or ``"valid_pairs"``, with
    ``index`` the 0-based pair)."""

    def __init__(self, argument: str, message: str, index: int | None = None):
        super().__init__(message)
        self.argument = argument
        self.index = index


def declared_context_length(model) -> int | None:
    """The context length ``model`` declares in its args (None when it declares none)."""
    args = getattr(model, "args", None)
    for name in CONTEXT_ATTRIBUTES:
        value = getattr(args, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def context_length(model) -> int:
    """:func:`declared_context_length`, or :data:`FALLBACK_CONTEXT` when there is none."""
    declared = declared_context_length(model)
    return FALLBACK_CONTEXT if declared is None else declared


def guard_words(source_words: int) -> int:
    """Target words a run over a known source of N words may write at most by default:
    ``2 N + 10`` (``simulref.decoder``'s runaway guard, see docs/decoder.md)."""
    check_int("source_words", source_words, minimum=0)
    return 2 * source_words + 10


@dataclass(frozen=True)
class Need:
    """Tokens a run needs at least: ``prompt`` (prompt + assistant header) and
    ``target`` (one per target word up to the guard). ``training``: a training pair's
    exact count instead, ``prompt`` its source tokens and ``target`` its fed target
    tokens (header + reference)."""

    prompt: int
    target: int
    training: bool = False

    @property
    def total(self) -> int:
        return self.prompt + self.target


def check_fits(need: Need | None, context: int, *, target_start: int | str = "auto",
               assumed: bool = False) -> None:
    """Raise :class:`ContextError` when a run cannot fit in ``context`` tokens.

    ``need``: what a known source needs (None for a live stream: only ``target_start`` is
    checked, for one target token). ``assumed``: ``context`` is :data:`FALLBACK_CONTEXT`,
    not the model's own (the message says so)."""
    check_int("context", context, minimum=1)
    of = (f"the assumed context of {context} tokens (the model declares none)" if assumed
          else f"the model's context of {context} tokens")
    if need is not None and need.total > context:
        raise ContextError("source", (
            f"the pair needs {need.total} tokens ({need.prompt} for the source prompt + "
            f"{need.target} for the assistant header and the reference), more than {of}; "
            f"shorten or drop it") if need.training else (
            f"the source needs at least {need.total} tokens ({need.prompt} for the prompt + "
            f"at least one per target word up to the {need.target}-word guard), more than "
            f"{of}; split it into shorter pieces"))
    if target_start != "auto":
        check_int("target_start", target_start, minimum=0)
        words = 1 if need is None else need.target
        last = target_start + words
        if last > context:
            counted = (f"{words} target token(s) of the longest pair" if need and
                       need.training else f"{words} target word(s) at least")
            raise ContextError("target_start", (
                f"{target_start} puts the target group at positions up to {last} "
                f"({counted}), past {of}; expected at most {max(context - words, 0)}"))


def need_of(tokenizer, words, *, system: str, max_new_words: int | None = None) -> Need:
    """:class:`Need` of a known source: its prompt as the decoder segments it
    (``simulref.prompt.assemble``) plus the assistant header, and the word guard
    (``max_new_words``, or :func:`guard_words` of the source's length)."""
    from simulref.prompt import assemble

    prompt = assemble(tokenizer, words, system=system)
    guard = guard_words(len(prompt.words)) if max_new_words is None else max_new_words
    return Need(prompt=len(prompt.ids) + len(prompt.header_ids), target=guard)


def check_examples_fit(examples, context: int, *, target_start: int | str = "auto",
                       assumed: bool = False, argument: str = "pairs") -> None:
    """:func:`check_fits` for training examples (:class:`simulref.finetune.Example`):
    each pair's source and fed target tokens, then an explicit ``target_start`` with the
    longest target. ContextError's ``argument``: ``argument`` (the pair's ``index`` set)
    or ``"target_start"``."""
    for index, example in enumerate(examples):
        need = Need(prompt=len(example.source), target=len(example.inputs), training=True)
        try:
            check_fits(need, context, assumed=assumed)
        except ContextError as error:
            raise ContextError(argument, f"{argument}[{index}]: {error}", index) from None
    if target_start != "auto" and examples:
        longest = max(len(example.inputs) for example in examples)
        try:
            check_fits(Need(prompt=0, target=longest, training=True), context,
                       target_start=target_start, assumed=assumed)
        except ContextError as error:
            raise ContextError("target_start", f"target_start: {error}") from None
