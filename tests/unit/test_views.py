"""Terminal views and plots: rendered to a fixed-width console and compared as text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from simulref.cli.views import (
    VIEWS,
    live_view,
    side_by_side_view,
    status_line,
    steps,
    trace_view,
    uncommitted_tail,
)
from simulref.plots import plot_quality_latency, plot_staircase, staircase_points
from simulref.policy import WaitK, schedule
from simulref.trace import BlankRun, DroppedEos, Finish, Hypothesis, Read, SourceEnd, Write

SOURCE = "The quick brown fox jumps".split()


def render(renderable, width: int = 80) -> str:
    console = Console(record=True, width=width, color_system=None, file=_Null())
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


class _Null:
    def write(self, text):
        return len(text)

    def flush(self):
        pass


def wait_k_events(source, target, k, *, finish="eos", dt=0.25):
    """Events of a wait-k run: target word i after min(k + i, N) reads (via the policy's
    own schedule simulator), times dt apart."""
    delays = schedule(WaitK(k), len(source), len(target))
    events, read = [], 0
    for i, (word, delay) in enumerate(zip(target, delays, strict=True)):
        while read < delay:
            events.append(Read(read, source[read], (read + 10,), 0.0))
            read += 1
        events.append(Write(i, (" " if i else "") + word, (i + 100,), 0.0))
    while read < len(source):
        events.append(Read(read, source[read], (read + 10,), 0.0))
        read += 1
    if finish:
        events.append(Finish(finish, 0.0))
    return [type(e)(**{**e.__dict__, "t": round(n * dt, 3)}) for n, e in enumerate(events)]


EXAMPLE = [
    Read(0, "The", (1,), 0.0),
    Read(1, "quick", (2,), 0.1),
    Read(2, "brown", (3,), 0.2),
    Write(0, "Le", (5,), 0.5),
    Read(3, "fox", (4,), 0.6),
    Write(1, " renard", (6, 7), 0.9),
    DroppedEos(3, 1.0),
    Write(2, " brun", (8,), 1.2),
]


def test_live_view_running_shows_cursors_and_pending_words():
    assert render(live_view(EXAMPLE, SOURCE)) == (
        "source The quick brown fox ▌jumps\n"
        "target Le renard brun▌\n"
        "read 4/? · written 3 · lag 1 · early EOS dropped ×1 · running"
    )


def test_live_view_finished_has_no_cursor_and_knows_the_length():
    events = [*EXAMPLE, Read(4, "jumps", (9,), 1.3), Write(3, " saute", (10,), 1.4),
              Finish("eos", 1.5)]
    assert render(live_view(events, SOURCE)) == (
        "source The quick brown fox jumps\n"
        "target Le renard brun saute\n"
        "read 5/5 · written 4 · early EOS dropped ×1 · finish: eos"
    )


def test_live_view_before_anything_happened():
    assert render(live_view([], [])) == (
        "source ▌\ntarget ▌\nread 0/? · written 0 · lag 0 · running"
    )


def test_live_view_collapses_newlines_in_written_text():
    events = [Read(0, "Hi", (1,)), Write(0, "Salut", (2,)), Write(1, "\n\nà", (3,))]
    assert render(live_view(events, ["Hi"])).splitlines()[1] == "target Salut à▌"


def test_side_by_side_rows_are_steps():
    assert render(side_by_side_view(EXAMPLE, SOURCE)) == (
        "\n"
        " step   read              written\n"
        " ─────────────────────────────────────────\n"
        "    1   The quick brown   Le\n"
        "    2   fox               renard brun ⟂EOS\n"
        "    …   jumps\n"
        "\n"
        "read 4/? · written 3 · lag 1 · early EOS dropped ×1 · running"
    )


def test_trace_view_one_row_per_event_with_times():
    text = render(trace_view([*EXAMPLE, Finish("cancelled", 1.5)], SOURCE))
    assert text == (
        "\n"
        " t (s)   event      #   text                tokens\n"
        " ─────────────────────────────────────────────────\n"
        " 0.000   read       0   The                      1\n"
        " 0.100   read       1   quick                    1\n"
        " 0.200   read       2   brown                    1\n"
        " 0.500   write      0   Le                       1\n"
        " 0.600   read       3   fox                      1\n"
        " 0.900   write      1   renard                   2\n"
        " 1.000   drop-eos   3   early EOS dropped\n"
        " 1.200   write      2   brun                     1\n"
        " 1.500   finish         cancelled\n"
        "         unread         jumps\n"
        "\n"
        "read 4/5 · written 3 · early EOS dropped ×1 · finish: cancelled"
    )


def test_trace_view_times_count_from_t0():
    events = [Read(0, "a", (1,), 10.0), Write(0, "b", (2,), 10.5)]
    assert " 0.500 " in render(trace_view(events, ["a"], t0=10.0))
    assert " 10.500 " in render(trace_view(events, ["a"], t0=0.0))


def test_trace_view_shows_words_waiting_to_be_read():
    text = render(trace_view([Read(0, "a", (1,), 0.0)], ["a", "b", "c"]))
    assert text.splitlines()[-3].split() == ["waiting", "b", "c"]


words = st.lists(st.from_regex(r"[A-Za-zé]{1,8}", fullmatch=True), min_size=1, max_size=12)


@given(source=words, target=words, k=st.integers(1, 6), cut=st.integers(0, 40))
def test_steps_partition_the_events(source, target, k, cut):
    events = wait_k_events(source, target, k)[:cut]
    got = steps(events)
    assert [r for s in got for r in s.reads] == [e for e in events if isinstance(e, Read)]
    assert [w for s in got for w in s.writes] == [e for e in events if isinstance(e, Write)]
    # Reads then writes, step after step, replays the events in their order.
    replay = [e for s in got for e in (*s.reads, *s.writes)]
    assert replay == [e for e in events if isinstance(e, (Read, Write))]
    # Every step but possibly the first starts by reading; only the last may lack writes.
    assert all(s.reads for s in got[1:])
    assert all(s.writes for s in got[:-1])


@given(source=words, target=words, k=st.integers(1, 6))
def test_wait_k_side_by_side_first_step_reads_k_words(source, target, k):
    got = steps(wait_k_events(source, target, k))
    assert len(got[0].reads) == min(k, len(source))
    assert len(got[0].writes) == (len(target) if k >= len(source) else 1)


@given(source=words, target=words, k=st.integers(1, 6), cut=st.integers(0, 40))
def test_every_view_shows_the_words_so_far(source, target, k, cut):
    events = wait_k_events(source, target, k)[:cut]
    written = [e.word for e in events if isinstance(e, Write)]
    for name, view in VIEWS.items():
        # Wide enough that no word wraps, so each must appear whole.
        text = render(view(events, source), width=400)
        for word in [*source, *written]:
            assert word in text, (name, word)
    live_target = render(live_view(events, source), width=400).splitlines()[1]
    assert live_target.removeprefix("target ").rstrip("▌") == " ".join(written)


@given(source=words, target=words, k=st.integers(1, 6), cut=st.integers(0, 40))
def test_status_line_counts(source, target, k, cut):
    events = wait_k_events(source, target, k)[:cut]
    text = status_line(events, source).plain
    n_read = sum(isinstance(e, Read) for e in events)
    n_written = sum(isinstance(e, Write) for e in events)
    if any(isinstance(e, Finish) for e in events):
        assert text.startswith(f"read {n_read}/{len(source)} · written {n_written} · finish")
    else:
        lag = n_read - n_written
        assert text == f"read {n_read}/? · written {n_written} · lag {lag} · running"


@given(delays=st.lists(st.integers(1, 30), max_size=20).map(sorted))
def test_staircase_points(delays):
    xs, ys = staircase_points(delays)
    assert xs[0] == 0 and ys[0] == 0
    assert len(xs) == len(ys) == len(delays) + 1
    # The vertex at target word i sits at the number of words read before it.
    assert all(xs[i + 1] == d and ys[i + 1] == i + 1 for i, d in enumerate(delays))


def test_plots_write_png_and_svg_atomically_and_deterministically(tmp_path):
    curves = {"group": [(2.0, 10.0, 1), (3.5, 14.0, 3)], "interleaved": [(2.2, 6.0, 1)]}
    paths = plot_quality_latency(curves, tmp_path / "ql", offline=(8.0, 20.0))
    assert [p.name for p in paths] == ["ql.png", "ql.svg"]
    assert paths[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    svg = paths[1].read_text()
    assert "<svg" in svg and "k=3" in svg and "offline" in svg
    plot_quality_latency(curves, tmp_path / "again", offline=(8.0, 20.0))
    assert (tmp_path / "again.svg").read_text() == svg
    stairs = plot_staircase({"group k=3": ([3, 4, 5, 5], 3), "offline": ([5, 5], None)}, 5,
                            tmp_path / "stairs")
    assert all(p.stat().st_size > 0 for p in stairs)
    assert "group k=3" in stairs[1].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "again.png", "again.svg", "ql.png", "ql.svg", "stairs.png", "stairs.svg"]


BLANK = [
    Read(0, "The", (1,), 0.0),
    BlankRun(0, (9, 9), 0.1),
    Read(1, "quick", (2,), 0.2),
    Write(0, "Le", (5,), 0.3),
]


def test_a_blank_run_shows_in_every_view():
    rows = render(side_by_side_view(BLANK, SOURCE)).splitlines()[3:5]
    assert [row.split() for row in rows] == [["1", "The", "⟂blank"], ["2", "quick", "Le"]]
    rows = render(trace_view(BLANK, SOURCE)).splitlines()
    assert ["0.100", "blank", "0", "whitespace", "only", "2"] in [row.split() for row in rows]
    assert render(live_view(BLANK, SOURCE)).splitlines()[-1] == (
        "read 2/? · written 1 · lag 1 · blank runs ×1 · running"
    )


def test_trace_view_shows_the_end_of_a_live_source():
    events = [Read(0, "a", (1,), 0.0), SourceEnd(1, (7, 8), 0.25), Write(0, " b", (2,), 0.5),
              Finish("eos", 0.75)]
    text = render(trace_view(events, ["a"]))
    assert " 0.250   end      1   end of source        2" in text


# LocalAgreement: the last hypothesis's words past the commits, dimmed after the cursor.
AGREEMENT = [
    Read(0, "The", (1,), 0.0),
    Hypothesis(1, (5, 6), 0.1),
    Read(1, "quick", (2,), 0.2),
    Hypothesis(2, (5, 7, 8), 0.3),
    Write(0, "Le", (5,), 0.4),
]
SPELL = {5: "Le", 6: " vite", 7: " rapide", 8: " renard"}.__getitem__


def _spell(ids):
    return "".join(map(SPELL, ids))


def test_uncommitted_tail_is_the_last_hypothesis_past_the_writes():
    assert uncommitted_tail(AGREEMENT[:2]) == (5, 6)
    assert uncommitted_tail(AGREEMENT) == (7, 8)
    assert uncommitted_tail(AGREEMENT + [Write(1, " rapide", (7,), 0.5),
                                         Write(2, " renard", (8,), 0.6)]) == ()
    assert uncommitted_tail(AGREEMENT + [Finish("eos", 0.7)]) == ()
    assert uncommitted_tail(EXAMPLE) == ()  # no hypotheses: wait-k


def test_live_view_dims_the_uncommitted_tail_after_the_cursor():
    console = Console(record=True, width=80, color_system="standard", file=_Null())
    console.print(live_view(AGREEMENT, SOURCE, detokenize=_spell))
    text = console.export_text(styles=False, clear=False)
    assert "target Le▌ rapide renard" in text
    styled = console.export_text(styles=True)
    assert "\x1b[2;32m rapide renard" in styled  # dim green, not bold
    # Without a way to spell tokens the view is as before.
    assert "rapide" not in render(live_view(AGREEMENT, SOURCE))
