"""Translation quality: hypothesis clean-up and corpus BLEU / chrF via sacrebleu (no MLX).

sacrebleu is imported when a score is computed, so importing this module stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = [
    "KNOWN_SPECIAL_TOKENS",
    "KNOWN_ASSISTANT_HEADERS",
    "clean_hypothesis",
    "corpus_bleu",
    "corpus_chrf",
    "quality_scores",
]

# Markers of the chat formats simulref meets (ChatML: SmolLM2, Qwen; Llama 3; Gemma;
# Llama 2 / SentencePiece). None of them is a piece of natural text.
KNOWN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>",
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
    "<s>", "</s>",
)

KNOWN_ASSISTANT_HEADERS: tuple[str, ...] = (
    "<|im_start|>assistant\n",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<start_of_turn>model\n",
)

# What a header leaves behind when it is decoded with its special tokens skipped: the
# role word and a newline. Only that exact form is removed: "assistant" followed by a
# space may well start a real French sentence ("assistant de direction").
_KNOWN_ROLES = ("assistant", "model")


def _strings(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of str, got {value!r}")
    out = tuple(value)
    for s in out:
        if not isinstance(s, str) or not s:
            raise TypeError(f"{name} must hold non-empty str, got {s!r}")
    return out


def _role_of(header: str, tokens: Sequence[str]) -> str:
    for tok in tokens:
        header = header.replace(tok, " ")
    return header.strip()


def clean_hypothesis(
    text: str,
    special_tokens: Sequence[str] = (),
    assistant_header: str | None = None,
) -> str:
    """``text`` without chat-template debris, stripped of surrounding whitespace.

    Removes, at the start, the assistant header (``assistant_header`` if given, and the
    known ChatML / Llama 3 / Gemma headers) or else what such a header leaves when
    decoded without its special tokens (its role word followed by a newline, e.g.
    ``"assistant\\n"``); and, anywhere, the special tokens (``special_tokens`` and
    :data:`KNOWN_SPECIAL_TOKENS`), a token between two words leaving one space. A
    legitimate leading word is kept: only these exact strings are removed."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    tokens = _strings("special_tokens", special_tokens) + KNOWN_SPECIAL_TOKENS
    headers = KNOWN_ASSISTANT_HEADERS
    roles = list(_KNOWN_ROLES)
    if assistant_header is not None:
        if not isinstance(assistant_header, str) or not assistant_header.strip():
            raise TypeError(f"assistant_header must be a non-empty str, got {assistant_header!r}")
        headers = (assistant_header, *headers)
        role = _role_of(assistant_header, tokens)
        if role:
            roles.insert(0, role)
    # Longest first, so that "<|im_start|>assistant\n" wins over "<|im_start|>".
    headers = tuple(sorted(set(headers), key=len, reverse=True))
    token_re = re.compile(
        r"\s*(?:" + "|".join(re.escape(t) for t in sorted(set(tokens), key=len, reverse=True))
        + r")\s*"
    )
    role_re = re.compile(
        r"(?:" + "|".join(re.escape(r) for r in sorted(set(roles), key=len, reverse=True))
        + r")[ \t]*\n"
    )

    leading = headers + tuple(sorted(set(tokens), key=len, reverse=True))
    out = text
    header_seen = False
    while True:  # peel header debris off the start until nothing changes
        before = out
        out = out.lstrip()
        for piece in leading:
            if out.startswith(piece):
                out = out[len(piece):]
                header_seen = header_seen or piece in headers
                break
        # After a whole header, what follows is the translation, even "assistant\n".
        role = None if header_seen else role_re.match(out)
        if role:
            out = out[role.end():]
        if out == before:
            break
    return token_re.sub(" ", out).strip()


def _corpus(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    hyps = list(_texts("hypotheses", hypotheses))
    refs = list(_texts("references", references))
    if len(hyps) != len(refs):
        raise ValueError(
            f"hypotheses and references must have the same length, got {len(hyps)} and "
            f"{len(refs)}"
        )
    if not hyps:
        raise ValueError("hypotheses is empty: corpus scores need at least one sentence")
    return hyps, refs


def _texts(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of str (one per sentence), got {value!r}")
    out = tuple(value)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(s).__name__}")
    return out


def _bleu(hyps: list[str], refs: list[str]) -> tuple[float, str]:
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    score = metric.corpus_score(hyps, [refs]).score
    return float(score), str(metric.get_signature())


def _chrf(hyps: list[str], refs: list[str]) -> tuple[float, str]:
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    score = metric.corpus_score(hyps, [refs]).score
    return float(score), str(metric.get_signature())


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0..100), sacrebleu defaults (13a tokenization, exp smoothing), one
    reference per hypothesis."""
    return _bleu(*_corpus(hypotheses, references))[0]


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0..100), sacrebleu defaults (character 6-grams, beta 2)."""
    return _chrf(*_corpus(hypotheses, references))[0]


def quality_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, object]:
    """``{"BLEU", "chrF"}`` scores with sacrebleu's signatures (``"BLEU_signature"``,
    ``"chrF_signature"``), ready to be stored next to the numbers."""
    hyps, refs = _corpus(hypotheses, references)
    bleu, bleu_sig = _bleu(hyps, refs)
    chrf, chrf_sig = _chrf(hyps, refs)
    return {"BLEU": bleu, "chrF": chrf, "BLEU_signature": bleu_sig, "chrF_signature": chrf_sig}
