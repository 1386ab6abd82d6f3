"""simulref.checks: the one integer-argument checker (library and command line)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref.checks import check_int, describe, is_int, parse_int


def test_a_bool_is_not_an_int():
    assert is_int(3) and is_int(-1) and not is_int(True) and not is_int(3.0)
    with pytest.raises(TypeError, match="k: expected an int >= 1, got True"):
        check_int("k", True, minimum=1)


@given(value=st.integers(-50, 50), low=st.none() | st.integers(-10, 10),
       high=st.none() | st.integers(-10, 10))
def test_check_int_accepts_exactly_the_range(value, low, high):
    inside = (low is None or value >= low) and (high is None or value <= high)
    if inside:
        assert check_int("n", value, minimum=low, maximum=high) == value
        assert parse_int(f" {value} ", minimum=low, maximum=high) == value
    else:
        with pytest.raises(ValueError, match=re.escape(f"n: expected {describe(low, high)}")):
            check_int("n", value, minimum=low, maximum=high)
        with pytest.raises(ValueError, match="expected an integer"):
            parse_int(str(value), minimum=low, maximum=high)


def test_messages():
    assert describe(0, 9) == "an int in [0, 9]" and describe(None, 3) == "an int <= 3"
    assert check_int("n", None, none_ok=True) is None
    with pytest.raises(TypeError, match=r"n: expected an int >= 0 or None, got '3'"):
        check_int("n", "3", minimum=0, none_ok=True)
    with pytest.raises(ValueError, match="expected an integer >= 1, got 'two'"):
        parse_int("two", minimum=1)
