"""Sentence segmentation of a growing source, one word at a time (pure; no MLX).

Long-form decoding needs sentence boundaries while the source is still arriving: a
finished sentence pair is what the context keeps and what eviction drops. The boundary
must be *stable*: a sentence once closed is never reopened by later words, or the
context already built on it would be wrong. The PyPI segmenters tried (pysbd 0.3.4,
sentencex 1.0.32) re-split earlier text as more words arrive (docs/longform.md gives
cases), so this module uses a small rule with one word of lookahead instead.

**The rule.** There is a boundary between word ``w`` and the next word ``v`` when

1. ``w`` ends with ``.``, ``!``, ``?`` or ``…`` (any run of them), possibly followed by
   closing quotes or brackets (``"')]»”’``);
2. ``v`` starts, after opening quotes or brackets (``"'([«“‘¿¡``), with an upper-case
   letter or a digit;
3. ``w`` (closers stripped) is not an abbreviation: not in :data:`ABBREVIATIONS`
   (case-insensitive: titles such as ``Mr.``, ``Dr.``, ``No.``, ``Fig.``, ``vs.``), not
   an initial (``J.``: one letter and a dot) and not a dotted acronym (``e.g.``,
   ``U.S.``: letters each followed by a dot). A dotted acronym that really ends a
   sentence is missed: a missed boundary only makes one sentence longer, a false one
   splits a sentence in two.

The decision uses ``w`` and ``v`` only, so it is made once ``v`` has arrived and never
changes: the last sentence of a prefix is always open (it may continue), every earlier
one is final. At the end of the stream the open sentence is closed too. Words are
whitespace-free tokens, as simulref splits a source (``source.split()``); the rule is
written for English sources (German ordinals such as ``3. Oktober`` would split).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "ABBREVIATIONS",
    "is_boundary",
    "sentence_ends",
    "split_sentences",
    "SentenceSplitter",
]

# Abbreviations that are usually followed by a capitalised word or a number without
# ending the sentence (titles before names, "No. 5", "Fig. 3"). "etc." and "Inc." are
# left out on purpose: they end sentences as often as not.
ABBREVIATIONS = frozenset({
    "mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "mt.", "rev.", "hon.",
    "gen.", "col.", "lt.", "sgt.", "capt.", "gov.", "sen.", "rep.", "pres.",
    "no.", "nos.", "fig.", "figs.", "vol.", "vols.", "ch.", "sec.", "pp.", "p.",
    "vs.", "cf.", "approx.", "dept.", "est.", "ed.", "eq.", "art.",
    "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.", "sep.", "sept.", "oct.",
    "nov.", "dec.",
})
_FINAL = ".!?…"
_CLOSERS = "\"')]»”’"
_OPENERS = "\"'([«“‘¿¡"


def _check_word(name: str, word: object) -> str:
    if not isinstance(word, str):
        raise TypeError(f"{name} must be a str, got {type(word).__name__}")
    if not word or word != word.strip() or len(word.split()) != 1:
        raise ValueError(f"{name} must be one word without whitespace, got {word!r}")
    return word


def _is_abbreviation(core: str) -> bool:
    if core.lower() in ABBREVIATIONS:
        return True
    if len(core) == 2 and core[0].isalpha() and core[1] == ".":
        return True  # an initial: "J."
    pieces = core.split(".")
    # "e.g." -> ["e", "g", ""]: single letters, each followed by a dot.
    return (len(pieces) >= 3 and pieces[-1] == ""
            and all(len(p) == 1 and p.isalpha() for p in pieces[:-1]))


def is_boundary(word: str, next_word: str) -> bool:
    """Whether a sentence ends after ``word`` when ``next_word`` follows (the rule above)."""
    word = _check_word("word", word)
    next_word = _check_word("next_word", next_word)
    core = word.rstrip(_CLOSERS)
    if not core or core[-1] not in _FINAL:
        return False
    start = next_word.lstrip(_OPENERS)
    if not start or not (start[0].isupper() or start[0].isdigit()):
        return False
    # Only a lone "." can be an abbreviation's; "Dr.!" or "e.g.?" ends the sentence.
    if core.endswith(".") and core.rstrip(".") and core[-2:-1] not in _FINAL:
        return not _is_abbreviation(core)
    return True


def sentence_ends(words: Sequence[str], *, final: bool = False) -> list[int]:
    """The end (exclusive word index) of every closed sentence of ``words``, in order.

    A sentence closes at a boundary between two words present, so the last sentence stays
    open unless ``final`` (the stream has ended), which closes it too. Stable: the ends of
    a prefix (``final=False``) are a prefix of the ends of any extension."""
    if isinstance(words, (str, bytes)) or not isinstance(words, Sequence):
        raise TypeError(f"words must be a sequence of str, got {type(words).__name__}")
    for i, w in enumerate(words):
        _check_word(f"words[{i}]", w)
    ends = [i + 1 for i in range(len(words) - 1) if is_boundary(words[i], words[i + 1])]
    if final and words:
        ends.append(len(words))
    return ends


def split_sentences(words: Sequence[str], *, final: bool = False
                    ) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    """``(closed sentences, open rest)`` of ``words``; their concatenation is ``words``.
    With ``final`` every sentence is closed and the rest is empty."""
    ends = sentence_ends(words, final=final)
    starts = [0, *ends]
    closed = [tuple(words[a:b]) for a, b in zip(starts, ends, strict=False)]
    return closed, tuple(words[starts[-1]:])


class SentenceSplitter:
    """The rule on a stream: :meth:`push` one word, get the sentences it closes (at
    most one: the one before it); :meth:`finish` closes the last. The sentences are
    those :func:`split_sentences` gives for the words so far."""

    def __init__(self) -> None:
        self._open: list[str] = []

    @property
    def open_words(self) -> tuple[str, ...]:
        """The words of the sentence in progress."""
        return tuple(self._open)

    def push(self, word: str) -> list[tuple[str, ...]]:
        word = _check_word("word", word)
        closed = []
        if self._open and is_boundary(self._open[-1], word):
            closed.append(tuple(self._open))
            self._open = []
        self._open.append(word)
        return closed

    def extend(self, words: Iterable[str]) -> list[tuple[str, ...]]:
        return [s for w in words for s in self.push(w)]

    def finish(self) -> list[tuple[str, ...]]:
        """Close the sentence in progress (none if no word is pending)."""
        closed = [tuple(self._open)] if self._open else []
        self._open = []
        return closed
