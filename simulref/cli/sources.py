"""Where the command line's source words come from: TEXT, a file on stdin (read whole),
or a live stdin read word by word as it arrives (:class:`Arrivals` lets a view show words
that came before the policy reads them)."""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from simulref.cli.args import UsageError

_SPACE = re.compile(rb"[ \t\n\r\f\v]+")


def words_from_chunks(chunks: Iterable[bytes]) -> Iterator[str]:
    """Words from a byte stream as soon as each is complete (followed by whitespace or
    the end). Works on bytes so a UTF-8 character split across chunks stays whole."""
    pending = b""
    for chunk in chunks:
        parts = _SPACE.split(pending + chunk)
        pending = parts.pop()  # the last part may continue in the next chunk
        for part in parts:
            if part:
                yield part.decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")


def words_from_stream(stream) -> Iterator[str]:
    """Words from ``stream`` as they arrive. A real file descriptor is read with
    ``os.read`` (returns whatever is there, no buffering that would wait for more); other
    streams line by line."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is not None:
        yield from words_from_chunks(iter(lambda: os.read(fd, 4096), b""))
    else:
        for line in iter(stream.readline, ""):
            yield from line.split()


def paced(words: Iterable[str], delay: float, sleep: Callable[[float], None] = time.sleep):
    """Yield ``words`` with ``delay`` seconds between them (a replayed live source)."""
    for i, word in enumerate(words):
        if i and delay:
            sleep(delay)
        yield word


def require_words(words: Iterable[str], what: str) -> Iterator[str]:
    """Pass words through; a source that ends without one is a usage error."""
    empty = True
    for word in words:
        empty = False
        yield word
    if empty:
        raise UsageError(f"{what}: no source words")


class Arrivals:
    """Pulls words from a (possibly blocking) iterator on a thread, so a display can
    show words that arrived before the policy reads them. Iterating yields the words
    in order and blocks while none has arrived: the decoder still waits for the
    source, which is what keeps wait-k honest when the input stalls."""

    _END = object()

    def __init__(self, words: Iterable[str]):
        self.words: list[str] = []
        self.ended = False
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(iter(words),), daemon=True)
        self._thread.start()

    def _pump(self, words: Iterator[str]) -> None:
        try:
            for word in words:
                self.words.append(word)
                self._queue.put(word)
        except BaseException as error:  # handed to the consumer, raised there
            self._queue.put(error)
        finally:
            self.ended = True
            self._queue.put(self._END)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def source_words(text: str | None, stdin=None) -> Iterable[str]:
    """The source: TEXT's words, or words read from stdin as they arrive (``-``/none).
    Stdin redirected from a regular file (``< source.txt``) is read whole: nothing more
    will arrive, and a known source can be checked against the context up front."""
    if text is None or text == "-":
        stream = stdin if stdin is not None else sys.stdin
        if _is_regular_file(stream):
            words = stream.buffer.read().decode("utf-8", errors="replace").split()
            if not words:
                raise UsageError("stdin: no source words")
            return words
        return require_words(words_from_stream(stream), "stdin")
    check_utf8(text, "TEXT")
    words = text.split()
    if not words:
        raise UsageError("TEXT: expected at least one word")
    return words


def check_utf8(text: str, what: str) -> None:
    """Refuse text that held bytes that are not UTF-8: on Linux such argv bytes arrive as
    lone surrogates (``\udce9`` for byte 0xe9), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        byte = (f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF
                else f"U+{ord(bad):04X}")
        raise UsageError(f"{what}: not UTF-8 ({byte} at character {error.start + 1}); "
                         f"expected UTF-8 text") from None


def _source_name(text: str | None) -> str:
    return "stdin" if text is None or text == "-" else "TEXT"


def _is_regular_file(stream) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode) and hasattr(stream, "buffer")
    except (AttributeError, OSError, ValueError):
        return False
