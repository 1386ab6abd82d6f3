"""Latency metrics: hand-computed cases, edge cases, properties, traces."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref.metrics import (
    DEGENERACY_THRESHOLD,
    METRICS,
    al,
    ap,
    atd,
    computation_aware_delays,
    dal,
    degeneracy,
    hypothesis_delays,
    laal,
    latency_scores,
    yaal,
)
from simulref.trace import DroppedEos, Finish, Read, Settings, Trace, Write

SETTINGS = Settings(model="m", k=2, layout="group", system="s")


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# ------------------------------------------------------------------ hand-computed cases


def test_wait_2_on_four_words():
    d, x = [2, 3, 4, 4], 4
    assert close(ap(d, x, 4), 13 / 16)
    assert close(al(d, x, 4), 2.0)  # tau = 3: (2 + 2 + 2) / 3
    assert close(laal(d, x, 4), 2.0)
    assert close(dal(d, x), 2.0)  # g' = 2, 3, 4, 5
    assert close(atd(d), 2.0)  # ends 3, 4, 5, 6 paired with source words 1, 2, 3, 4


def test_long_hypothesis_against_a_short_reference():
    d, x = [1, 1, 3, 3, 3, 3], 3
    assert close(ap(d, x, 4), 14 / 12)  # SimulEval's default divides by the reference length
    assert close(ap(d, x, 6), 14 / 18)
    assert close(al(d, x, 4), (1 + 0.25 + 1.5) / 3)  # step 3/4, tau = 3
    assert close(al(d, x, 6), (1 + 0.5 + 2) / 3)  # step 1/2
    assert close(laal(d, x, 4), al(d, x, 6))  # max(n, |Y*|) = 6
    assert close(dal(d, x), 10 / 6)  # g' = 1, 1.5, 3, 3.5, 4, 4.5 with step 1/2
    # Chunks {1,1} and {3,3,3,3}; target ends 2..7; paired source words 1,1,2,3,3,3.
    assert close(atd(d), (1 + 2 + 2 + 2 + 3 + 4) / 6)


def test_writing_before_reading_anything():
    d = [0, 1]
    assert close(ap(d, 1, 2), 0.5)
    assert close(al(d, 1, 2), 0.25)
    assert close(dal(d, 1), 0.25)
    assert close(atd(d), 1.0)  # the first target word is paired with "no source" (time 0)


def test_one_word_after_the_whole_source():
    assert close(ap([3], 3, 1), 1.0)
    assert close(al([3], 3, 1), 3.0)
    assert close(dal([3], 3), 3.0)
    assert close(atd([3]), 3.0)  # ends at 4, paired with source word 1 (ends at 1)


def test_first_delay_beyond_the_source_is_returned_by_al():
    # Only possible with times (computation-aware): SimulEval returns d_1 as it is.
    assert al([5.0, 6.0], 4.0, 2) == 5.0
    assert laal([5.0, 6.0], 4.0, 1) == 5.0
    assert close(dal([5.0, 6.0], 4.0), 5.0)  # g' = 5, 7 with step 2: DAL has no such rule


def test_atd_with_computation_time():
    # Words of 0.5 s, targets without duration, 1 s of computation before the first
    # word and 0.25 s more before the second: ends 1.0 + 1.0 = 2.0, max(1.5, 2.0) + 0.25.
    got = atd([2, 3], [1.0, 1.25], word_duration=0.5, target_token_duration=0.0)
    assert close(got, ((2.0 - 0.5) + (2.25 - 1.0)) / 2)


def test_al_atd_and_laal_are_not_monotone_in_the_delays():
    # Waiting one more word can *lower* them (tau moves earlier; chunks pair differently),
    # so no monotonicity property is claimed for them; AP and DAL are monotone (below).
    assert al([0, 1, 3, 8, 8, 8], 8, 7) < al([0, 1, 3, 7, 8, 8], 8, 7)
    assert laal([0, 0, 1, 7, 7], 7, 3) < laal([0, 0, 1, 6, 7], 7, 3)
    assert atd([0, 0, 2, 6, 6, 7, 7]) < atd([0, 0, 1, 6, 6, 7, 7])


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: al([], 3, 3), ValueError, "delays is empty"),
        (lambda: ap([], 3, 3), ValueError, "delays is empty"),
        (lambda: dal([], 3), ValueError, "delays is empty"),
        (lambda: atd([]), ValueError, "delays is empty"),
        (lambda: al([1], 0, 3), ValueError, "source_length must be > 0"),
        (lambda: ap([1], 0, 3), ValueError, "source_length must be > 0"),
        (lambda: dal([0], 0), ValueError, "source_length must be > 0"),
        (lambda: al([1], 3, 0), ValueError, "target_length must be > 0"),
        (lambda: laal([1], 3, -1), ValueError, "reference_length must be > 0"),
        (lambda: al([2, 1], 3, 2), ValueError, "non-decreasing"),
        (lambda: al([-1, 1], 3, 2), ValueError, ">= 0"),
        (lambda: al([1, math.nan], 3, 2), ValueError, "finite"),
        (lambda: al([True], 3, 2), TypeError, "delays"),
        (lambda: al("12", 3, 2), TypeError, "delays must be a sequence"),
        (lambda: al([1], "3", 2), TypeError, "source_length"),
        (lambda: atd([1.5]), ValueError, "whole source words"),
        (lambda: atd([1, 2], [0.1]), ValueError, "one time per delay"),
        (lambda: atd([1, 2], [0.2, 0.1]), ValueError, "compute must be non-decreasing"),
        (lambda: atd([1], word_duration=0), ValueError, "word_duration must be > 0"),
        (lambda: atd([1], target_token_duration=-1), ValueError, "target_token_duration"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------ properties


@st.composite
def schedules(draw, max_source=12, max_target=14):
    """Non-decreasing delays in 0..|X|, with |X| and a reference length."""
    x = draw(st.integers(1, max_source))
    n = draw(st.integers(1, max_target))
    d = sorted(draw(st.lists(st.integers(0, x), min_size=n, max_size=n)))
    y = draw(st.integers(1, max_target))
    return d, x, y


def wait_k(k: int, n: int) -> list[int]:
    return [min(k + i, n) for i in range(n)]


@given(st.integers(0, 30), st.integers(1, 30))
def test_ideal_wait_k_lags_k_words(k, n):
    d = wait_k(k, n)
    lag = min(k, n)
    assert close(al(d, n, n), lag)
    assert close(laal(d, n, n), lag)
    assert close(dal(d, n), lag)
    # ATD charges every target word its own unit of time: wait-0 still lags one word.
    assert close(atd(d), max(lag, 1))


@given(schedules())
def test_dal_is_at_least_al_over_the_hypothesis_length(case):
    d, x, _ = case
    assert dal(d, x) >= al(d, x, len(d)) - 1e-9


@given(schedules())
def test_laal_is_at_least_al_with_the_same_reference(case):
    d, x, y = case
    assert laal(d, x, y) >= al(d, x, y) - 1e-9
    if len(d) <= y:
        assert close(laal(d, x, y), al(d, x, y))


@given(schedules())
def test_laal_with_the_hypothesis_length_is_al(case):
    d, x, _ = case
    assert close(laal(d, x, len(d)), al(d, x, len(d)))


@given(schedules(), st.data())
def test_ap_and_dal_grow_with_the_delays(case, data):
    d, x, y = case
    j = data.draw(st.integers(0, len(d) - 1))
    later = list(d)
    later[j] = data.draw(st.integers(d[j], d[j + 1] if j + 1 < len(d) else x))
    assert ap(later, x, y) >= ap(d, x, y)
    assert dal(later, x) >= dal(d, x) - 1e-9


@given(schedules())
def test_bounds(case):
    d, x, y = case
    assert 0 <= ap(d, x, len(d)) <= 1
    assert al(d, x, y) <= x  # each lag is at most d_i <= |X|
    assert dal(d, x) >= d[0] - 1e-9
    assert atd(d) >= 1 - 1e-9  # every target word takes one unit after its source


@given(schedules(), st.floats(0.01, 100))
def test_times_scale_with_the_word_duration(case, w):
    d, x, y = case
    scaled = [di * w for di in d]
    assert close(ap(scaled, x * w, y), ap(d, x, y))
    assert math.isclose(al(scaled, x * w, y), w * al(d, x, y), rel_tol=1e-9, abs_tol=1e-7 * w)
    assert math.isclose(laal(scaled, x * w, y), w * laal(d, x, y), rel_tol=1e-9,
                        abs_tol=1e-7 * w)
    assert math.isclose(dal(scaled, x * w), w * dal(d, x), rel_tol=1e-9, abs_tol=1e-7 * w)
    assert math.isclose(atd(d, word_duration=w), w * atd(d), rel_tol=1e-9, abs_tol=1e-7 * w)


@given(schedules(), st.floats(0.0, 5.0))
def test_atd_computation_before_the_first_word_delays_by_at_most_that(case, c):
    # It delays the first target word by c; later words may absorb it while they wait
    # for their source words, so the mean grows by something in [c/n, c].
    d, _, _ = case
    got = atd(d, [c] * len(d))
    assert atd(d) + c / len(d) - 1e-9 <= got <= atd(d) + c + 1e-9


# ------------------------------------------------------------------ traces


def make_trace(source: list[str], schedule: list[int], times=None, pieces=None) -> Trace:
    """Reads and writes in the order the delays give; optional per-event times."""
    events: list = []
    read = 0
    clock = iter(times) if times is not None else None
    for i, d in enumerate(schedule):
        while read < d:
            events.append(Read(read, source[read], (read,), next(clock) if clock else 0.0))
            read += 1
        text = pieces[i] if pieces else f" w{i}"
        events.append(Write(i, text, (100 + i,), next(clock) if clock else 0.0))
    while read < len(source):
        events.append(Read(read, source[read], (read,), next(clock) if clock else 0.0))
        read += 1
    events.append(Finish("eos", next(clock) if clock else 0.0))
    return Trace(SETTINGS, tuple(source), tuple(events))


@given(schedules())
def test_latency_scores_of_a_trace(case):
    d, x, y = case
    trace = make_trace([f"s{j}" for j in range(x)], d)
    assert list(trace.delays) == d
    got = latency_scores(trace, y)
    assert set(got) == set(METRICS) | ({"YAAL"} if d[0] < x else set())
    assert close(got["AP"], ap(d, x, y))
    assert close(got["AL"], al(d, x, y))
    assert close(got["LAAL"], laal(d, x, y))
    assert close(got["DAL"], dal(d, x))
    assert close(got["ATD"], atd(d))
    own = latency_scores(trace)  # no reference: |Y| = hypothesis length
    assert close(own["AL"], al(d, x, len(d))) and close(own["AP"], ap(d, x, len(d)))


def test_hypothesis_words_are_counted_as_simuleval_splits_them():
    trace = make_trace(["a", "b", "c"], [1, 2, 3], pieces=[" de la", "\n", " maison"])
    assert hypothesis_delays(trace) == [(1, 0.0), (1, 0.0), (3, 0.0)]
    assert close(latency_scores(trace)["AL"], al([1, 1, 3], 3, 3))


def test_computation_aware_scores():
    # Two source words of 0.5 s each; the decoder's clock starts at 100.
    source = ["The", "cat"]
    # events: Read a (100.2), Write (100.5), Read b (100.6), Write (101.0), Finish (101.1)
    trace = make_trace(source, [1, 2], times=[100.2, 100.5, 100.6, 101.0, 101.1])
    elapsed, duration = computation_aware_delays(trace, 0.5, start=100.0)
    assert duration == 1.0
    assert all(close(a, b) for a, b in zip(elapsed, [0.5 + 0.5, 1.0 + 1.0], strict=True))
    got = latency_scores(trace, 2, word_duration=0.5, start=100.0)
    assert close(got["AL_CA"], al(elapsed, 1.0, 2))
    assert close(got["AP_CA"], ap(elapsed, 1.0, 2))
    assert close(got["LAAL_CA"], laal(elapsed, 1.0, 2))
    assert close(got["DAL_CA"], dal(elapsed, 1.0))
    assert close(got["ATD_CA"], atd([1, 2], [0.5, 1.0], word_duration=0.5))
    with pytest.raises(ValueError, match="before start"):
        computation_aware_delays(trace, 0.5, start=200.0)


@given(schedules(), st.floats(0.05, 2.0))
def test_without_computation_the_ca_scores_are_the_word_scores_in_seconds(case, w):
    d, x, y = case
    trace = make_trace([f"s{j}" for j in range(x)], d)  # every event at t = 0 = start
    got = latency_scores(trace, y, word_duration=w)
    for name in ("AL", "LAAL", "DAL", "ATD"):
        assert math.isclose(got[f"{name}_CA"], w * got[name], rel_tol=1e-9, abs_tol=1e-7)
    assert close(got["AP_CA"], got["AP"])


def test_trace_errors():
    empty = Trace(SETTINGS, ("a",), (Read(0, "a", (1,)), DroppedEos(0), Finish("eos")))
    with pytest.raises(ValueError, match="no target words"):
        latency_scores(empty)
    no_source = Trace(SETTINGS, (), (Write(0, " x", (1,)),))
    with pytest.raises(ValueError, match=r"\|X\| = 0"):
        latency_scores(no_source)
    one = make_trace(["a"], [1])
    with pytest.raises(ValueError, match="reference_length must be > 0"):
        latency_scores(one, 0)
    with pytest.raises(TypeError, match="reference_length must be an int"):
        latency_scores(one, 2.0)
    with pytest.raises(TypeError, match="trace must be a Trace"):
        latency_scores([1, 2])


# ------------------------------------------------------------------ YAAL (OmniSTEval)


def test_yaal_cuts_at_the_end_of_the_source():
    d, x = [1, 2, 3, 3], 3
    # |Y| = max(4, 4): step 3/4; words 1 and 2 are before the end: (1 + (2 - 0.75)) / 2.
    assert close(yaal(d, x, 4), 1.125)
    assert close(laal(d, x, 4), (1 + 1.25 + 1.5) / 3)  # LAAL also counts the word at |X|
    assert close(yaal(d, x, 2), 1.125)  # |Y| = max(n, 2) = 4 as well
    assert close(yaal(d, x, 8), (1 + (2 - 3 / 8)) / 2)


def test_yaal_is_undefined_when_the_first_word_comes_at_the_end():
    assert yaal([3, 3], 3, 2) is None
    assert yaal([0.5, 4.0], 3.0, 2) == 0.5  # times: the first word is before the end
    assert yaal([3.5], 3.0, 1) is None


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: yaal([], 3, 1), ValueError, "delays is empty"),
        (lambda: yaal([2, 1], 3, 1), ValueError, "non-decreasing"),
        (lambda: yaal([1], 0, 1), ValueError, "source_length must be > 0"),
        (lambda: yaal([1], 3, 0), ValueError, "reference_length must be > 0"),
        (lambda: degeneracy([([1], 0, 1)]), ValueError, r"schedules\[0\] source_length"),
        (lambda: degeneracy([([2, 1], 3, 1)]), ValueError, r"schedules\[0\] delays"),
        (lambda: degeneracy([[1, 3, 1]]), TypeError, r"schedules\[0\] must be a"),
    ],
)
def test_yaal_and_degeneracy_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@given(st.integers(0, 30), st.integers(1, 30))
def test_ideal_wait_k_yaal_is_k_until_the_policy_reads_everything_first(k, n):
    got = yaal(wait_k(k, n), n, n)
    if k >= n:
        assert got is None  # every word comes at the end of the source
    else:
        assert close(got, k)


@given(schedules())
def test_yaal_is_laal_when_every_word_comes_before_the_end(case):
    d, x, y = case
    d = [min(di, x - 1) for di in d]
    assert close(yaal(d, x, y), laal(d, x, y))


@given(schedules(), st.integers(1, 5))
def test_words_after_the_end_do_not_change_yaal(case, extra):
    d, x, y = case
    if d[0] >= x:
        return
    later = d + [x] * extra
    # Same |Y| = max(n, reference_length) for both: the tail words are simply cut.
    reference = max(len(later), y)
    assert close(yaal(later, x, reference), yaal(d, x, reference))


@given(schedules())
def test_yaal_bounds(case):
    d, x, y = case
    got = yaal(d, x, y)
    assert (got is None) == (d[0] >= x)
    if got is not None:
        assert got < x  # every counted lag is at most d_i < |X|
        assert got <= max(di for di in d if di < x) + 1e-9


@given(schedules(), st.floats(0.01, 100))
def test_yaal_scales_with_the_word_duration(case, w):
    d, x, y = case
    words = yaal(d, x, y)
    seconds = yaal([di * w for di in d], x * w, y)
    assert (words is None) == (seconds is None)
    if words is not None:
        assert math.isclose(seconds, w * words, rel_tol=1e-9, abs_tol=1e-7 * w)


def test_latency_scores_leave_out_an_undefined_yaal():
    late = make_trace(["a", "b"], [2, 2])
    assert "YAAL" not in latency_scores(late, 2)
    assert "YAAL_CA" not in latency_scores(late, 2, word_duration=0.5)
    early = make_trace(["a", "b"], [1, 2], times=[0.1, 0.2, 0.3, 0.4, 0.5])
    got = latency_scores(early, 2, word_duration=0.5)
    assert close(got["YAAL"], yaal([1, 2], 2, 2))
    elapsed, duration = computation_aware_delays(early, 0.5)
    assert close(got["YAAL_CA"], yaal(elapsed, duration, 2))


# ------------------------------------------------------------------ degeneracy


def test_degeneracy_of_a_simultaneous_policy():
    got = degeneracy([([1, 2, 3, 3], 3, 4)])
    assert close(got["SWF"], 50.0)  # 2 of 4 words before the end
    assert close(got["EFSW"], 100 * (3 - 1.125) / 3)  # YAAL 1.125 (above)
    assert close(got["DSPTV"], 62.5 - 50.0)
    assert got["degenerate"] is False


def test_degeneracy_of_a_policy_that_writes_one_word_then_waits():
    # One word at once, the rest after the end: YAAL rewards the single early word.
    got = degeneracy([([0] + [5] * 9, 5, 10)])
    assert close(got["SWF"], 10.0) and close(got["EFSW"], 100.0)
    assert close(got["DSPTV"], 90.0) and got["degenerate"] is True


def test_degeneracy_micro_averages_and_skips_what_omnisteval_skips():
    got = degeneracy([([1, 2, 3, 3], 3, 4), ([3, 3], 3, 2), ([], 4, 2)])
    assert close(got["SWF"], 100 * 2 / 6)  # every word of every sentence with output
    assert close(got["EFSW"], 100 * (3 - 1.125) / 3)  # YAAL undefined: not in EFSW
    only_late = degeneracy([([3, 3], 3, 2)])
    assert only_late["SWF"] == 0.0 and math.isnan(only_late["EFSW"])
    assert math.isnan(only_late["DSPTV"]) and only_late["degenerate"] is False
    nothing = degeneracy([([], 3, 1)])
    assert all(math.isnan(nothing[k]) for k in ("SWF", "EFSW", "DSPTV"))
    assert nothing["degenerate"] is None


@given(st.lists(schedules(), min_size=1, max_size=6), st.randoms())
def test_degeneracy_properties(corpus, random):
    got = degeneracy(corpus)
    assert 0 <= got["SWF"] <= 100
    # YAAL can be negative (words ahead of the ideal diagonal): EFSW can pass 100.
    assert math.isnan(got["EFSW"]) or got["EFSW"] >= 0
    if not math.isnan(got["DSPTV"]):
        assert close(got["DSPTV"], got["EFSW"] - got["SWF"])
        assert got["degenerate"] == (abs(got["DSPTV"]) > DEGENERACY_THRESHOLD)
    shuffled = list(corpus)
    random.shuffle(shuffled)
    again = degeneracy(shuffled)  # a corpus statistic: the order of sentences is irrelevant
    for key in ("SWF", "EFSW", "DSPTV"):
        assert close(again[key], got[key]) or (math.isnan(again[key]) and math.isnan(got[key]))
    if all(di < x for d, x, _ in corpus for di in d):
        assert got["SWF"] == 100.0
