"""Policies are pure: checked exhaustively on small sizes and by hypothesis."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref.policy import READ, WRITE, Action, ReadAll, Scripted, WaitK, schedule


@pytest.mark.parametrize("n", range(0, 31))
def test_waitk_schedule_is_min_k_plus_i_n(n):
    for k in range(1, n + 3):
        assert schedule(WaitK(k), n, n + 5) == tuple(min(k + i, n) for i in range(n + 5))


@given(k=st.integers(1, 50), read=st.integers(0, 60), written=st.integers(0, 60),
       done=st.booleans())
def test_waitk_decision(k, read, written, done):
    action = WaitK(k).decide(read, written, done)
    assert action is (WRITE if done or read >= k + written else READ)


@given(read=st.integers(0, 60), written=st.integers(0, 60), done=st.booleans())
def test_read_all_reads_until_done(read, written, done):
    assert ReadAll().decide(read, written, done) is (WRITE if done else READ)


@given(n=st.integers(0, 30), m=st.integers(0, 30))
def test_read_all_schedule(n, m):
    assert schedule(ReadAll(), n, m) == (n,) * m


@given(st.lists(st.integers(1, 10), max_size=12).map(sorted), st.integers(0, 12),
       st.integers(0, 15))
def test_scripted_follows_its_script_capped_at_n(delays, n, m):
    expected = tuple(min(delays[i], n) if i < len(delays) else n for i in range(m))
    assert schedule(Scripted(delays), n, m) == expected


@given(k=st.integers(1, 20), n=st.integers(0, 30))
def test_waitk_is_scripted_min_k_plus_i(k, n):
    scripted = Scripted([k + i for i in range(n + 3)])
    assert schedule(scripted, n, n + 3) == schedule(WaitK(k), n, n + 3)


@pytest.mark.parametrize("k", [0, -1])
def test_waitk_rejects_k_below_one(k):
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        WaitK(k)


@pytest.mark.parametrize("k", [1.0, "3", True, None])
def test_waitk_rejects_non_int_k(k):
    with pytest.raises(TypeError, match="k: expected an int"):
        WaitK(k)


@pytest.mark.parametrize("delays", [[0], [2, 1], [1, "2"], [True]])
def test_scripted_rejects_bad_delays(delays):
    with pytest.raises(ValueError, match="delays"):
        Scripted(delays)


def test_scripted_rejects_non_sequence():
    with pytest.raises(TypeError, match="delays"):
        Scripted("123")


def test_decide_validates_state():
    with pytest.raises(TypeError, match="read"):
        WaitK(2).decide(1.5, 0, False)
    with pytest.raises(ValueError, match="written"):
        WaitK(2).decide(0, -1, False)
    with pytest.raises(TypeError, match="source_done"):
        WaitK(2).decide(0, 0, 1)
    with pytest.raises(ValueError, match="read: expected at most source_length"):
        WaitK(2).decide(4, 0, True, 3)


def test_action_values():
    assert {a.value for a in Action} == {"read", "write"}
    assert WaitK(3).name == "wait-3"
