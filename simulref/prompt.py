"""Chat-template discovery and prompt assembly: the instruction kept whole, the source in words.

A simultaneous decoder reads the source one word at a time, so the prompt is built from
segments, each tokenized on its own: segment 0 is the prefix (system turn with the whole
instruction, then the user header), segments 1..N are the source words (word i as
``" " + word`` except the first), segment N+1 is the end of the user turn. The prompt ids are
the concatenation of the segment tokenizations, because that is what a stream can produce;
they may differ from tokenizing the rendered text in one go (the text is the same).

Pure: no MLX. A tokenizer is anything with the Hugging Face ``encode`` / ``decode`` /
``apply_chat_template`` methods, e.g. a ``PreTrainedTokenizerFast`` or an mlx-lm
``TokenizerWrapper``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from simulref.checks import is_int

DEFAULT_SYSTEM = "Translate the following English paragraph to French"

SYSTEM_SLOT = "{system}"
# Markers no sane chat template alters: no surrounding whitespace, so `| trim` keeps them;
# mixed case, so a template that changes case is caught.
SYS_SENTINEL = "SimulRefSystemSentinel7f3a"
SENTINEL = "SimulRefSourceSentinel7f3a"
PLACEMENTS = ("system_turn", "user_turn")


class ChatFormatError(ValueError):
    """The tokenizer's chat template could not be split into prefix, suffix and header."""


@dataclass(frozen=True)
class ChatFormat:
    """The text around the source. ``prefix`` holds ``"{system}"`` exactly once, where the
    instruction goes; other braces are literal. ``system_placement`` is ``"system_turn"``
    when the instruction has a turn of its own, ``"user_turn"`` when it sits at the start of
    the user turn (templates without a system role)."""

    prefix: str
    suffix: str
    header: str
    system_placement: str = "system_turn"

    def __post_init__(self):
        for name in ("prefix", "suffix", "header", "system_placement"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"ChatFormat.{name}: expected str, got {getattr(self, name)!r}")
        if self.prefix.count(SYSTEM_SLOT) != 1:
            raise ValueError(f"ChatFormat.prefix: expected {SYSTEM_SLOT!r} exactly once, "
                             f"got {self.prefix!r}")
        if self.system_placement not in PLACEMENTS:
            raise ValueError(f"ChatFormat.system_placement: expected one of {PLACEMENTS}, "
                             f"got {self.system_placement!r}")

    def render_prefix(self, system: str) -> str:
        # Split rather than str.format, so literal braces in a template need no escaping.
        before, after = self.prefix.split(SYSTEM_SLOT)
        return before + system + after


def _render(tokenizer, messages, generation: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation)
    if not isinstance(text, str):
        raise ChatFormatError(f"apply_chat_template(tokenize=False) returned {type(text)}")
    return text


def _fail(why: str) -> ChatFormatError:
    return ChatFormatError(f"tokenizer: cannot discover the chat format ({why}); "
                           "pass an explicit chat_format=ChatFormat(prefix=..., suffix=..., "
                           "header=...)")


def discover_chat_format(tokenizer) -> ChatFormat:
    """The chat format of ``tokenizer``'s own chat template.

    Renders ``[system: SYS_SENTINEL, user: SENTINEL]`` with and without the generation
    prompt: the difference is the assistant header; the rendering without it, split around
    the sentinels, gives the prefix (``"{system}"`` in place of SYS_SENTINEL) and the suffix.

    Templates without a system role either raise (e.g. Gemma 2) or fold the system text into
    the first user turn themselves (e.g. Gemma 3). If rendering with a system role raises,
    the instruction is folded here as ``system + "\\n\\n" + source`` in a lone user turn and
    ``system_placement`` is ``"user_turn"``; it is also ``"user_turn"`` when the template
    puts the system text exactly where it would put user content. Raises
    :class:`ChatFormatError` (a ``ValueError``) when the template is missing or cannot be
    split; the format is never guessed.
    """
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError("tokenizer: expected a Hugging Face tokenizer or mlx-lm "
                        f"TokenizerWrapper, got {type(tokenizer).__name__}")
    try:
        messages = [{"role": "system", "content": SYS_SENTINEL},
                    {"role": "user", "content": SENTINEL}]
        plain = _render(tokenizer, messages, False)
        placement = "system_turn"
    except Exception as system_error:  # templates signal "no system role" in many ways
        messages = [{"role": "user", "content": SYS_SENTINEL + "\n\n" + SENTINEL}]
        try:
            plain = _render(tokenizer, messages, False)
        except Exception as error:
            raise _fail(f"rendering failed: {error!r}; with a system role: "
                        f"{system_error!r}") from error
        placement = "user_turn"
    try:
        prompted = _render(tokenizer, messages, True)
    except Exception as error:
        raise _fail(f"rendering the generation prompt failed: {error!r}") from error

    if plain.count(SYS_SENTINEL) != 1 or plain.count(SENTINEL) != 1:
        raise _fail(f"the sentinels do not appear once each in {plain!r}")
    head, suffix = plain.split(SENTINEL)
    if SYS_SENTINEL not in head:
        raise _fail(f"the system text does not come before the source in {plain!r}")
    if SYSTEM_SLOT in head:
        raise _fail(f"the template text itself contains {SYSTEM_SLOT!r}")
    if not prompted.startswith(plain) or prompted == plain:
        raise _fail("the generation prompt does not extend the rendering without it: "
                    f"{plain!r} vs {prompted!r}")
    if placement == "system_turn" and _folds_system(tokenizer, head):
        placement = "user_turn"
    return ChatFormat(prefix=head.replace(SYS_SENTINEL, SYSTEM_SLOT), suffix=suffix,
                      header=prompted[len(plain):], system_placement=placement)


def _folds_system(tokenizer, head: str) -> bool:
    """True when the template renders the system text where a user's content would go."""
    try:
        user_head = _render(tokenizer, [{"role": "user", "content": SENTINEL}], False)
    except Exception:  # a template may require a system turn; then it has one
        return False
    return user_head.split(SENTINEL)[0] == head.split(SYS_SENTINEL)[0]


ASSISTANT_SENTINEL = "SimulRefTargetSentinel7f3a"
NEXT_SENTINEL = "SimulRefNextSentinel7f3a"


@dataclass(frozen=True)
class TurnBreak:
    """What a chat template puts between an assistant turn's content and the next user
    turn's content, cut where the two position groups meet: ``close`` ends the assistant
    turn (target side; spelled as the user turn's suffix, e.g. ``"<|im_end|>\\n"``),
    ``open`` starts the next user turn (source side, e.g. ``"<|im_start|>user\\n"``).
    Long-form decoding (:mod:`simulref.longform`) makes each sentence pair a turn."""

    close: str
    open: str

    def ids(self, tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(close ids, open ids)``, each tokenized on its own as control text (as the
        prefix and the header are)."""
        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()

        return encode(self.close), encode(self.open)


def discover_turn_break(tokenizer, chat_format: ChatFormat) -> TurnBreak:
    """The :class:`TurnBreak` of ``tokenizer``'s chat template, for prompts in
    ``chat_format``.

    Renders a conversation of two user turns around an assistant turn (the instruction
    placed as ``chat_format`` places it) and checks that it starts as the one-turn prompt
    does (prefix, content, suffix, header) and that the second user turn ends with the
    suffix. The text between the assistant's content and the next user's must start with
    the suffix (a turn ends the same way for both roles, as in ChatML, Llama 3 and Gemma):
    that is ``close``, the rest ``open``. Raises :class:`ChatFormatError` otherwise.
    """
    def fail(why: str) -> ChatFormatError:
        return ChatFormatError(f"tokenizer: cannot discover how its chat template starts a "
                               f"second turn ({why}); decode long-form with turns=False")

    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError("tokenizer: expected a Hugging Face tokenizer or mlx-lm "
                        f"TokenizerWrapper, got {type(tokenizer).__name__}")
    if chat_format.system_placement == "system_turn":
        first = [{"role": "system", "content": SYS_SENTINEL},
                 {"role": "user", "content": SENTINEL}]
    else:
        first = [{"role": "user", "content": SYS_SENTINEL + "\n\n" + SENTINEL}]
    messages = first + [{"role": "assistant", "content": ASSISTANT_SENTINEL},
                        {"role": "user", "content": NEXT_SENTINEL}]
    try:
        text = _render(tokenizer, messages, False)
    except Exception as error:  # templates signal what they refuse in many ways
        raise fail(f"rendering failed: {error!r}") from error
    start = (chat_format.render_prefix(SYS_SENTINEL) + SENTINEL + chat_format.suffix +
             chat_format.header + ASSISTANT_SENTINEL)
    if not text.startswith(start):
        raise fail(f"the first turn renders differently from the prompt: {text!r}")
    between, found, after = text[len(start):].partition(NEXT_SENTINEL)
    if not found or after != chat_format.suffix:
        raise fail(f"the second user turn does not end with the suffix: {text!r}")
    if not chat_format.suffix or not between.startswith(chat_format.suffix):
        raise fail(f"an assistant turn does not end with the user turn's suffix "
                   f"{chat_format.suffix!r}: {between!r}")
    return TurnBreak(close=chat_format.suffix, open=between[len(chat_format.suffix):])


def _check_system(system) -> str:
    if not isinstance(system, str):
        raise TypeError(f"system: expected the instruction as a str, got {system!r}")
    if not system.strip():
        raise ValueError("system: expected a non-empty instruction")
    if system != system.strip():
        # Some templates trim message content and some do not; refuse rather than diverge.
        raise ValueError(f"system: expected no leading or trailing whitespace, got {system!r}")
    return system


def _check_word(index: int, word) -> str:
    if not isinstance(word, str):
        raise TypeError(f"source[{index}]: expected a str word, got {word!r}")
    if word.split() != [word]:
        raise ValueError(f"source[{index}]: a word must be non-empty and must not contain "
                         f"whitespace (segmentation would be ambiguous), got {word!r}")
    return word


def _source_words(source) -> tuple[str, ...]:
    if isinstance(source, str):
        words = tuple(source.split())
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        words = tuple(_check_word(i, w) for i, w in enumerate(source))
    else:
        raise TypeError(f"source: expected a str or a sequence of str, got {source!r}")
    if not words:
        raise ValueError("source: expected at least one word")
    return words


@dataclass(frozen=True)
class Template:
    """A :class:`ChatFormat` bound to one tokenizer and one instruction.

    It keeps the tokenizer's ``encode`` / ``decode`` (not compared, not shown) so that
    :meth:`word_ids` can tokenize words as they arrive; two templates with equal ids compare
    equal whatever tokenizer made them.
    """

    system: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    header_ids: tuple[int, ...]
    chat_format: ChatFormat
    encode: Callable[[str], tuple[int, ...]] | None = field(default=None, compare=False,
                                                             repr=False)
    decode: Callable[[Sequence[int]], str] | None = field(default=None, compare=False,
                                                           repr=False)

    def word_ids(self, index: int, word: str) -> tuple[int, ...]:
        """Token ids of source word ``index`` (0-based): the first without a leading space.

        Raises ``ValueError`` when the tokenizer encodes the word to no tokens (a vocabulary
        without some byte tokens drops those bytes), since every read must feed a token.
        """
        if not is_int(index) or index < 0:
            raise ValueError(f"index: expected an int >= 0, got {index!r}")
        if self.encode is None:
            raise TypeError("Template.encode: this template was built without a tokenizer")
        word = _check_word(index, word)
        ids = self.encode(word if index == 0 else " " + word)
        if not ids:
            raise ValueError(f"source[{index}]: the tokenizer encodes {word!r} to no tokens")
        return ids


def _accepts_keyword(function, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def template_for(tokenizer, *, system: str, chat_format: ChatFormat | None = None) -> Template:
    """Bind ``tokenizer`` and the instruction ``system`` to a chat format (discovered from the
    tokenizer's chat template unless ``chat_format`` is given)."""
    system = _check_system(system)
    if chat_format is None:
        chat_format = discover_chat_format(tokenizer)
    elif not isinstance(chat_format, ChatFormat):
        raise TypeError(f"chat_format: expected a ChatFormat or None, got {chat_format!r}")

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    # Source text is data, never control: a word spelled like "<|im_end|>" must not become
    # the end-of-turn token and close the user turn early. Hugging Face tokenizers take
    # split_special_tokens; a plain tokenizer without the option has nothing to split.
    source_options = ({"split_special_tokens": True}
                      if _accepts_keyword(tokenizer.encode, "split_special_tokens") else {})

    def encode_source(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False, **source_options))

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    return Template(system=system, prefix_ids=encode(chat_format.render_prefix(system)),
                    suffix_ids=encode(chat_format.suffix), header_ids=encode(chat_format.header),
                    chat_format=chat_format, encode=encode_source, decode=decode)


@dataclass(frozen=True)
class Prompt:
    """The prompt as segments: ``spans[0]`` the prefix, ``spans[1..N]`` the words,
    ``spans[N+1]`` the suffix; ``ids`` is their concatenation."""

    ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    words: tuple[str, ...]
    template: Template

    @property
    def segments(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self.ids[start:end] for start, end in self.spans)

    @property
    def header_ids(self) -> tuple[int, ...]:
        return self.template.header_ids

    @property
    def text(self) -> str:
        if self.template.decode is None:
            raise TypeError("Template.decode: this template was built without a tokenizer")
        return self.template.decode(self.ids)


def assemble(tokenizer, source: str | Sequence[str], *, system: str,
             chat_format: ChatFormat | None = None) -> Prompt:
    """Segment the chat prompt for ``source`` under the instruction ``system``.

    ``source`` is a str (split on whitespace) or a sequence of words (each a non-empty str
    without whitespace). An empty source raises ``ValueError``: callers handle that case
    themselves. ``system`` is keyword-only and required, so an instruction can never be
    passed as source words; it must be a non-empty str without surrounding whitespace.
    """
    words = _source_words(source)
    template = template_for(tokenizer, system=system, chat_format=chat_format)
    pieces = [template.prefix_ids]
    pieces += [template.word_ids(i, w) for i, w in enumerate(words)]
    pieces.append(template.suffix_ids)
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    ids = tuple(token for piece in pieces for token in piece)
    return Prompt(ids=ids, spans=tuple(spans), words=words, template=template)
