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
    assert {a.value for a in Action} == {"read", "write", "look"}
    assert WaitK(3).name == "wait-3"


# ---------------------------------------------------------------- observing, syntax

from simulref.policy import (  # noqa: E402
    LOOK,
    Candidate,
    Confidence,
    LocalAgreement,
    decide,
    parse_policy,
)


@given(threshold=st.floats(0.0, 1.0), k_min=st.integers(1, 9), read=st.integers(0, 20),
       written=st.integers(0, 20), done=st.booleans(), prob=st.floats(0.0, 1.0))
def test_confidence_writes_when_sure_reads_otherwise(threshold, k_min, read, written, done,
                                                     prob):
    policy = Confidence(threshold, k_min)
    shown = []

    def look():
        shown.append(prob)
        return Candidate((7,), (prob,))

    action = decide(policy, read, written, done, None, look)
    if done:
        expected = WRITE
    elif read < k_min:
        expected = READ
    else:
        expected = WRITE if prob >= threshold else READ
    assert action is expected
    # It looks only when the answer hangs on the model.
    assert bool(shown) == (not done and read >= k_min)
    assert decide(policy, read, written, done, None) is (expected if not shown else LOOK)


@given(n=st.integers(0, 12), threshold=st.floats(0.0, 1.0))
def test_confidence_schedule_with_a_stand_in_model(n, threshold):
    """With a candidate probability of (read / N), Confidence writes once read/N reaches
    the threshold: schedule() drives an observing policy too."""
    def candidates(read, written):
        return Candidate((1,), (read / n if n else 1.0,))

    delays = schedule(Confidence(threshold), n, 4, candidates)
    first = next((r for r in range(1, n + 1) if r / n >= threshold), n)
    assert delays == (max(first, min(1, n)),) * 4


def test_schedule_refuses_an_observing_policy_without_candidates():
    with pytest.raises(ValueError, match="candidates: .* looks at the model"):
        schedule(Confidence(0.5), 3, 2)


policies = st.one_of(
    st.builds(WaitK, st.integers(1, 99)),
    st.just(ReadAll()),
    st.builds(Confidence, st.floats(0.0, 1.0), st.integers(1, 9)),
    st.builds(LocalAgreement, st.integers(1, 9), st.integers(1, 9)),
)


@given(policies)
def test_parse_policy_reads_back_every_name(policy):
    assert parse_policy(policy.name) == policy


@given(k=st.integers(1, 99), t=st.floats(0.0, 1.0), n=st.integers(1, 9), c=st.integers(1, 9))
def test_parse_policy_syntax(k, t, n, c):
    assert parse_policy(f"wait-k:{k}") == WaitK(k)
    assert parse_policy(f"confidence:{t!r}") == Confidence(t)
    assert parse_policy(f"confidence:{t!r}:k_min={c}") == Confidence(t, c)
    assert parse_policy(f"local-agreement:{n}") == LocalAgreement(n)
    assert parse_policy(f"local-agreement:{n}:chunk={c}") == LocalAgreement(n, c)


@pytest.mark.parametrize(("text", "match"), [
    ("wait-k", "expected 1 value"), ("wait-k:0", "k: expected an integer >= 1"),
    ("wait-k:x", "k: expected an integer"), ("confidence:1.5", "threshold: expected"),
    ("confidence:nan", "threshold: expected"), ("confidence:high", "threshold"),
    ("confidence:0.5:chunk=2", "unknown option"), ("local-agreement:2:chunk=0", "chunk"),
    ("local-agreement:2:chunk=1:chunk=2", "given twice"), ("greedy", "unknown policy"),
    ("local-agreement:chunk=2:2", "positional value after"), ("wait-3:4", "expected 0"),
])
def test_parse_policy_names_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_policy(text)
    assert "expected wait-k:K" in str(info.value) or "policy:" in str(info.value)


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: Confidence(1.5), ValueError, "threshold: expected a probability"),
    (lambda: Confidence(0.5, 0), ValueError, "k_min: expected an int >= 1"),
    (lambda: LocalAgreement(0), ValueError, "n: expected an int >= 1"),
    (lambda: LocalAgreement(2, 1.0), TypeError, "chunk: expected an int"),
    (lambda: Candidate((), ()), ValueError, "at least one"),
    (lambda: Candidate((1,), (2.0,)), ValueError, r"probs\[0\]"),
])
def test_bad_policy_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()
