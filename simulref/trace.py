"""Read/write events and traces (pure data; no MLX)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Read:
    """Source word ``source_index`` (0-based) was fed to the model.

    ``token_ids`` are the tokens fed for it (the end-of-user-turn suffix included on
    the last word)."""

    source_index: int
    word: str
    token_ids: tuple[int, ...]
    t: float = 0.0


@dataclass(frozen=True)
class Write:
    """Target word ``target_index`` (0-based) was written; ``text`` is its decoded
    piece including any leading whitespace."""

    target_index: int
    text: str
    token_ids: tuple[int, ...]
    t: float = 0.0

    @property
    def word(self) -> str:
        return self.text.strip()


@dataclass(frozen=True)
class DroppedEos:
    """The model sampled EOS after ``source_index + 1`` words were read, before the
    source ended; the decoder dropped it and read on."""

    source_index: int
    t: float = 0.0


@dataclass(frozen=True)
class Finish:
    reason: str
    t: float = 0.0


Event = Read | Write | DroppedEos | Finish
