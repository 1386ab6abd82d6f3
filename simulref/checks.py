"""One checker for integer arguments (counts, indices, sizes), library and command line.

Python's ``bool`` is an ``int`` (``True + True == 2``), but a flag passed where a count is
expected is always a mistake, so :func:`is_int` refuses it. :func:`check_int` raises
``TypeError`` for a value that is not such an int and ``ValueError`` for one out of range,
with one message shape everywhere: ``"<name>: expected an int >= 1, got 0"``.
:func:`parse_int` is the same check for text (a command-line option).

Pure; imports nothing heavy.
"""

from __future__ import annotations


def is_int(value: object) -> bool:
    """Whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def describe(minimum: int | None = None, maximum: int | None = None, *,
             none_ok: bool = False) -> str:
    """What :func:`check_int` expects, in words: ``"an int >= 1"``, ``"an int in [0, 9]"``."""
    if minimum is not None and maximum is not None:
        text = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        text = f"an int >= {minimum}"
    elif maximum is not None:
        text = f"an int <= {maximum}"
    else:
        text = "an int"
    return text + (" or None" if none_ok else "")


def check_int(name: str, value: object, *, minimum: int | None = None,
              maximum: int | None = None, none_ok: bool = False) -> int | None:
    """``value`` when it is an int (not a bool) in ``[minimum, maximum]`` (either bound
    may be None), or None when ``none_ok``; otherwise TypeError (not an int) or ValueError
    (out of range), naming ``name``."""
    if value is None and none_ok:
        return None
    expected = describe(minimum, maximum, none_ok=none_ok)
    if not is_int(value):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def parse_int(text: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int written in ``text`` (decimal, surrounding spaces allowed) within the bounds;
    ValueError with the expectation in words otherwise (``"expected an integer >= 1, got
    'two'"``), for command-line options."""
    expected = describe(minimum, maximum).replace("an int", "an integer", 1)
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected {expected}, got {text!r}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"expected {expected}, got {text!r}")
    return value


def as_option(parse):
    """An argparse ``type`` from a text parser that raises ValueError: argparse then
    reports the parser's own message for the option (one line; exit 2 on the command
    line). The library, the command line and the SimulEval agent share the parsers."""
    import argparse
    import functools

    @functools.wraps(parse)
    def option(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return option


def int_option(*, minimum: int | None = None, maximum: int | None = None):
    """The argparse ``type`` of an integer option within the bounds (:func:`parse_int`)."""
    import functools

    return as_option(functools.partial(parse_int, minimum=minimum, maximum=maximum))
