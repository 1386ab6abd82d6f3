"""Resegmentation of a long-form output against the reference sentences (pure; no MLX).

A long-form run writes one unbroken target for a whole document; quality and latency are
defined per reference sentence, so each hypothesis word must first be given to one
reference sentence. This is OmniSTEval's SoftSegmenter (Polák et al. 2025, "Better Late
Than Never", arXiv 2509.17349; ``omnisteval/alignment.py`` 0.1.10), word level, without
Moses tokenization (OmniSTEval's ``--lang`` unset); ``docs/longform.md`` states it in
full and ``tests/unit/test_longform_omnisteval.py`` holds it to OmniSTEval's assignment
word for word.

1. **Normalise.** Reference words: the sentence lower-cased and split on whitespace,
   then NFKC and lower-case again; hypothesis words: NFKC and lower-case. (The words
   written out stay as the hypothesis wrote them.)
2. **Align** the document's reference words (all sentences, in order) with the
   hypothesis words by dynamic programming: a match scores the Jaccard similarity of
   the two words' character *sets*, minus infinity when exactly one of them is a
   punctuation token (:data:`PUNCTUATION`); a gap costs nothing. Ties prefer a match,
   then skipping a reference word, then skipping a hypothesis word.
3. **Assign.** A matched hypothesis word goes to its reference word's sentence. An
   unmatched one goes to the sentence of the previous matched reference word, or of the
   next one when it is strictly more similar to that word; once one word of a run of
   unmatched words goes to the next reference word, the rest of the run follows it. A
   word with no reference word on either side that it may match (a punctuation token
   before the first reference word, say) is dropped, as OmniSTEval drops it.

The assignment is monotone: a later hypothesis word never goes to an earlier sentence.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

__all__ = ["PUNCTUATION", "normalize_word", "similarity", "assign_words", "resegment"]

# OmniSTEval's punctuation tokens (alignment.py): Latin, Chinese and Japanese.
PUNCTUATION = frozenset([".", "!", "?", ",", ";", ":", "-", "(", ")",
                         "。", "！", "？", "，", "；", "：", "—", "（", "）", "ー"])
_NEG_INF = float("-inf")

# Backtracking moves, in the order ties are broken.
_MATCH, _SKIP_REFERENCE, _SKIP_HYPOTHESIS = 0, 1, 2


def normalize_word(word: str) -> str:
    """The form a word is compared in: NFKC, lower case."""
    return unicodedata.normalize("NFKC", word).lower()


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the character sets of two normalised words, -inf when one
    is a punctuation token and the other is not (such a pair never matches)."""
    if (a in PUNCTUATION) != (b in PUNCTUATION):
        return _NEG_INF
    sa, sb = set(a), set(b)
    common = len(sa & sb)
    union = len(sa) + len(sb) - common
    return common / union if union else 0.0


def _check_texts(name: str, value: object) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of str, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(item).__name__}")
    return list(value)


def _align(ref: list[str], hyp: list[str]) -> list[tuple[int | None, int | None]]:
    """The alignment path as (reference index, hypothesis index) pairs, None for a gap.

    The scores are summed in the same order as OmniSTEval's, so ties (and thus the path)
    are decided identically."""
    n, m = len(ref), len(hyp)
    ref_sets = [(set(w), w in PUNCTUATION) for w in ref]
    hyp_sets = [(set(w), w in PUNCTUATION) for w in hyp]
    previous = [0.0] * (m + 1)
    moves = [[_SKIP_HYPOTHESIS] * (m + 1)]
    moves[0][0] = _MATCH
    for i in range(1, n + 1):
        rset, rpunct = ref_sets[i - 1]
        row = [0.0] * (m + 1)
        row_moves = [_SKIP_REFERENCE] * (m + 1)
        for j in range(1, m + 1):
            hset, hpunct = hyp_sets[j - 1]
            if rpunct != hpunct:
                sim = _NEG_INF
            else:
                common = len(rset & hset)
                union = len(rset) + len(hset) - common
                sim = common / union if union else 0.0
            match = previous[j - 1] + sim
            skip_ref = previous[j]
            skip_hyp = row[j - 1]
            if match >= skip_ref and match >= skip_hyp:
                row[j], row_moves[j] = match, _MATCH
            elif skip_ref >= skip_hyp:
                row[j], row_moves[j] = skip_ref, _SKIP_REFERENCE
            else:
                row[j], row_moves[j] = skip_hyp, _SKIP_HYPOTHESIS
        moves.append(row_moves)
        previous = row
    path: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        move = moves[i][j]
        if move == _MATCH:
            i, j = i - 1, j - 1
            path.append((i, j))
        elif move == _SKIP_REFERENCE:
            i -= 1
            path.append((i, None))
        else:
            j -= 1
            path.append((None, j))
    path.reverse()
    return path


def assign_words(references: Sequence[str], hypothesis_words: Sequence[str]) -> list[int | None]:
    """For each hypothesis word, the index of the reference sentence it is given to
    (None: dropped, see the module docstring). ``references``: the document's reference
    sentences in order; ``hypothesis_words``: the document's output, one word each
    (``text.split()``)."""
    references = _check_texts("references", references)
    words = _check_texts("hypothesis_words", hypothesis_words)
    for i, word in enumerate(words):
        if not word or len(word.split()) != 1 or word != word.strip():
            raise ValueError(f"hypothesis_words[{i}] must be one word, got {word!r}")
    ref_words: list[str] = []
    sentence_of: list[int] = []
    for s, sentence in enumerate(references):
        for word in sentence.strip().lower().split():
            ref_words.append(normalize_word(word))
            sentence_of.append(s)
    if not ref_words:
        raise ValueError("references have no words: there is nothing to align the output to")
    hyp = [normalize_word(w) for w in words]
    path = _align(ref_words, hyp)

    out: list[int | None] = [None] * len(words)
    last: int | None = None  # the previous reference word (index into ref_words)
    zone_end = 0  # path positions before it follow `ahead` (a run sent to the next word)
    ahead: int | None = None
    for p, (r, h) in enumerate(path):
        if r is None and p >= zone_end:
            # An unmatched hypothesis word: the previous or the next reference word?
            nxt = next((q for q in range(p, len(path)) if path[q][0] is not None), None)
            zone_end = len(path) if nxt is None else nxt
            nxt_ref = None if nxt is None else path[nxt][0]
            next_score = _NEG_INF if nxt_ref is None else similarity(hyp[h], ref_words[nxt_ref])
            last_score = _NEG_INF if last is None else similarity(hyp[h], ref_words[last])
            if next_score > last_score:
                r, ahead = nxt_ref, nxt_ref
            else:
                r, zone_end, ahead = last, p, None
        elif r is None:
            r = ahead  # inside a run that goes to the next reference word
        if r is not None and p >= zone_end:
            last = r
        if h is not None and r is not None:
            out[h] = sentence_of[r]
    return out


def resegment(references: Sequence[str], hypothesis_words: Sequence[str]) -> list[list[int]]:
    """The hypothesis word indices given to each reference sentence (one list per
    sentence, in order; empty when none), by :func:`assign_words`. Dropped words are in
    no list."""
    assigned = assign_words(references, hypothesis_words)
    segments: list[list[int]] = [[] for _ in references]
    for index, sentence in enumerate(assigned):
        if sentence is not None:
            segments[sentence].append(index)
    return segments
