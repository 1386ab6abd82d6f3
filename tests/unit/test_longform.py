"""Long-form decoding (simulref.longform): sentences, alignment, per-sentence wait-k,
eviction through the decoder, bounded memory."""

from __future__ import annotations

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_evict import one_layer_model
from test_observing import LookingWaitK

from simulref.decoder import stream, token_table
from simulref.longform import Evicted, Longform, SentenceDone, stream_longform
from simulref.policy import Confidence, LocalAgreement, WaitK
from simulref.testing import successor_model, tiny_model, tiny_tokenizer
from simulref.trace import BlankRun, DroppedEos, Finish, Read, SourceEnd, Write

WORDS = ["The", "dog", "runs.", "A", "cat", "sits", "here.", "We", "go", "home!", "fast",
         "now", "Is", "it?", "Dr.", "Smith", "came."]
SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", 0)


def strip(events):
    """Events without their times, for comparing runs."""
    out = []
    for e in events:
        d = dict(vars(e)) if hasattr(e, "__dict__") else {"value": repr(e)}
        d.pop("t", None)
        d.pop("method", None)  # (Evicted: compared runs may evict by different methods)
        out.append((type(e).__name__, d))
    return out


def run(model, tok, words, **options):
    """(Every pair the budget holds is kept unless a test says otherwise: the budget's
    evictions are what most tests here are about.)"""
    options.setdefault("max_history", None)
    session = Longform(model, tok, words, **options)
    return session, list(session.events())


def looping_model(tok):
    """A scripted model that writes one-token words forever (two tokens that follow each
    other) and never ends a sentence by itself: the per-sentence guard must."""
    table = token_table(tok)
    a, b = [i for i in range(len(table.pieces))
            if table.opens_word(i) and table.has_content(i)][:2]
    return successor_model(len(tok), {a: b, b: a}, a)


streams = st.lists(st.sampled_from(WORDS), min_size=1, max_size=24)
# Streams of several sentences, so that a small budget evicts.
sentence = st.tuples(st.sampled_from(["The", "A", "We"]),
                     st.lists(st.sampled_from(["dog", "cat", "runs", "sits"]), max_size=3),
                     st.sampled_from(["home.", "here!", "now?"]))
documents = st.lists(sentence, min_size=3, max_size=7).map(
    lambda ss: [w for first, middle, last in ss for w in (first, *middle, last)])


@SETTINGS
@given(words=streams, k=st.integers(1, 3))
def test_sentences_and_alignment_partition_the_run(llama, tok, words, k):
    session, events = run(llama, tok, words, k=k, max_tokens_per_word=3,
                          context_budget=10_000)
    done = [e for e in events if isinstance(e, SentenceDone)]
    reads = [e for e in events if isinstance(e, Read)]
    writes = [e for e in events if isinstance(e, Write)]
    assert [w for s in done for w in s.source_words] == words == [r.word for r in reads]
    assert [w for s in done for w in s.target_words] == [w.word for w in writes]
    assert [s.index for s in done] == list(range(len(done)))
    assert isinstance(events[-1], Finish) and not any(isinstance(e, Evicted) for e in events)
    # Alignment: a sentence's target words are written after its first read and
    # before the next sentence's first read.
    where = {id(e): i for i, e in enumerate(events)}
    first_read = {r.source_index: where[id(r)] for r in reads}
    for s, nxt in zip(done, done[1:] + [None], strict=True):
        lo = first_read[s.source_start]
        hi = first_read[nxt.source_start] if nxt else len(events)
        mine = [w for w in writes if lo < where[id(w)] < hi]
        assert tuple(w.word for w in mine) == s.target_words
        assert not mine or mine[0].target_index == s.target_start


@SETTINGS
@given(words=streams, k=st.integers(1, 3))
def test_wait_k_runs_per_sentence(llama, tok, words, k):
    """Before target word i of a sentence of n words, exactly min(k + i, n) of its words
    are read (more only after a dropped EOS or a blank run, which read one more)."""
    _, events = run(llama, tok, words, k=k, max_tokens_per_word=3, context_budget=10_000)
    starts = {s.source_start: s for s in events if isinstance(s, SentenceDone)}
    current, local, forced, read = None, 0, False, 0
    for e in events:
        if isinstance(e, Read):
            read = e.source_index + 1
            if e.source_index in starts:
                current, local, forced = starts[e.source_index], 0, False
        elif isinstance(e, (DroppedEos, BlankRun)):
            forced = True
        elif isinstance(e, Write):
            n, done = len(current.source_words), read - current.source_start
            assert done >= min(k + local, n)
            assert forced or done == min(k + local, n)
            local += 1


@SETTINGS
@given(words=documents, k=st.integers(1, 3), engine=st.sampled_from(["fused", "incremental"]))
def test_the_first_sentence_is_decoded_as_a_live_short_form_source(llama, tok, words, k,
                                                                     engine):
    """Up to the next sentence's first read, the run is the short-form run of the first
    sentence read as a live source: its end is known only after its last word, so the
    user turn's suffix goes in alone (SourceEnd) and the tail is written after it. (The
    short-form run ends with its Finish; the long-form one drops that EOS and reads on.)"""
    session, events = run(llama, tok, words, k=k, max_tokens_per_word=3, engine=engine,
                          context_budget=10_000)
    first = next(e for e in events if isinstance(e, SentenceDone))
    short = list(stream(llama, tok, iter(first.source_words), k=k, max_tokens_per_word=3,
                        engine=engine))
    assert isinstance(short[-1], Finish)
    cut = next(i for i, e in enumerate(events) if isinstance(e, SentenceDone))
    mine, end = events[:cut], short[-1]
    # Where the short-form run finishes (EOS, a word cut at the token limit, the guard),
    # the long-form one goes on: EOS dropped, the word written, the next sentence read.
    assert strip(mine[:len(short) - 1]) == strip(short[:-1])
    assert end.reason in ("eos", "max_tokens_per_word", "max_new_words")
    if end.reason == "eos":
        assert isinstance(mine[len(short) - 1], DroppedEos)
    if end.reason == "max_new_words":
        assert len(mine) == len(short) - 1
    assert sum(isinstance(e, SourceEnd) for e in mine) == 1


@settings(SETTINGS, max_examples=5)
@given(words=documents, k=st.integers(1, 3))
def test_without_history_every_sentence_is_decoded_as_a_live_short_form_source(llama, tok,
                                                                               words, k):
    """max_history=0 with the exact eviction: each sentence starts from the bare prefix,
    so it is decoded as the short-form run of its words read as a live source (up to
    where that run finishes; the first read also carries the turn before, evicted)."""
    options = dict(k=k, max_tokens_per_word=3, engine="incremental")
    session, events = run(llama, tok, words, max_history=0, eviction="reprefill",
                          **options)
    where = [i for i, e in enumerate(events) if isinstance(e, SentenceDone)]
    begin = 0
    for end in where:
        sentence = events[end]
        mine = [e for e in events[begin:end] if not isinstance(e, Evicted)]
        if sentence.index:  # its first read, without the turn before
            read = mine[0]
            mine[0] = Read(read.source_index, read.word,
                           tuple(session._run.template.word_ids(0, read.word)), read.t)
        short = list(stream(llama, tok, iter(sentence.source_words), **options))
        shift = {"source_index": sentence.source_start, "target_index": sentence.target_start}
        assert strip(mine[:len(short) - 1]) == [
            (name, {key: value + shift[key] if key in shift else value
                    for key, value in fields.items()})
            for name, fields in strip(short[:-1])]
        begin = end + 1
    evicted = [e for e in events if isinstance(e, Evicted)]
    assert [(e.first, e.last) for e in evicted] == [(i, i) for i in range(len(where) - 1)]


@settings(SETTINGS, max_examples=5)
@given(words=documents, k=st.integers(1, 3), keep=st.integers(0, 3),
       budget=st.sampled_from([60, 10_000]))
def test_max_history_bounds_the_pairs_kept(llama, tok, words, k, keep, budget):
    """Once a new sentence's first read is done (and any eviction after it), at most
    ``max_history`` finished pairs are in the cache, whatever the budget."""
    session = Longform(llama, tok, words, k=k, max_tokens_per_word=2, max_history=keep,
                       context_budget=budget)
    started = False
    for e in session.events():
        if started and not isinstance(e, Evicted):
            assert sum(not p.evicted for p in session.pairs) - 1 <= keep
        started = isinstance(e, Read) and e.source_index == session.pairs[-1].source_start


def test_a_list_and_a_generator_give_the_same_run(llama, tok):
    words = "The dog runs. A cat sits here. We go home!".split()
    _, a = run(llama, tok, words, k=2, context_budget=60, max_tokens_per_word=3)
    _, b = run(llama, tok, iter(words), k=2, context_budget=60, max_tokens_per_word=3)
    assert strip(a) == strip(b)
    assert any(isinstance(e, Evicted) for e in a)


def turn_chunks(session, events):
    """Per sentence, from the events alone: [its words' ids, its target tokens] (the ids a
    later sentence's first read carries before its own words are the turn before it).
    Every turn is closed, before the next starts, by one SourceEnd reading its suffix."""
    template = session._run.template
    close, opening = session._close, session._open
    pairs, closed = [], []
    for e in events:
        if isinstance(e, Read):
            if e.source_index in {p.source_start for p in session.pairs} and \
                    len(pairs) < len(session.pairs):
                ids = list(e.token_ids)
                if pairs:  # the turn before, as the conversation's next chunk
                    assert closed[-1]
                    chunk = history(template, close, opening, *pairs[-1])
                    assert ids[:len(chunk)] == chunk
                    ids = ids[len(chunk):]
                pairs.append([[], []])
                closed.append(False)
            else:
                ids = list(e.token_ids)
            pairs[-1][0].extend(ids)
        elif isinstance(e, (Write, BlankRun)):
            pairs[-1][1].extend(e.token_ids)
        elif isinstance(e, SourceEnd):
            assert e.token_ids == template.suffix_ids and not closed[-1]
            closed[-1] = True
        yield e, pairs


def history(template, close, opening, source, target):
    return [*source, *template.suffix_ids, *template.header_ids, *target, *close, *opening]


@SETTINGS
@given(words=documents, k=st.integers(1, 3), method=st.sampled_from(["rotate", "reprefill"]))
def test_after_an_eviction_the_context_is_the_kept_turns(llama, tok, words, k, method):
    """Turns: the source the session and the cache keep is the prefix plus the kept pairs
    as turns of the conversation (rebuilt from the events), then the sentence being read;
    the target group is empty (a new turn has not written yet)."""
    session = Longform(llama, tok, words, k=k, max_tokens_per_word=2, context_budget=60,
                       max_history=None,
                       eviction=method)
    engine, template = session._run.engine, session._run.template
    gone, evictions = set(), 0
    for e, pairs in turn_chunks(session, session.events()):
        if isinstance(e, Evicted):
            evictions += 1
            assert e.target_tokens == 0
            gone.update(range(e.first, e.last + 1))
            kept = [history(template, session._close, session._open, *p)
                    for i, p in enumerate(pairs[:-1]) if i not in gone]
            source = [*template.prefix_ids, *(t for c in kept for t in c), *pairs[-1][0]]
            assert session.source_ids == source
            assert engine.fed == [] and engine.shared.n_target == 0
            assert engine.shared.n_source == len(source) == session.context
    assume(evictions)


@SETTINGS
@given(words=documents, k=st.integers(1, 3), method=st.sampled_from(["rotate", "reprefill"]))
def test_after_an_eviction_the_context_is_the_kept_pairs_in_one_turn(llama, tok, words, k,
                                                                      method):
    """One turn: the tokens the session and the engine keep are the prompt's fixed parts
    plus the tokens of the pairs not evicted (from the events), and the cache holds them."""
    session = Longform(llama, tok, words, k=k, max_tokens_per_word=2, context_budget=40,
                       max_history=None,
                       eviction=method, turns=False)
    engine = session._run.engine
    template = session._run.template
    pairs, gone, evictions = [], set(), 0  # per sentence: [source ids, target ids]
    for e in session.events():
        if isinstance(e, Read):
            if e.source_index in {p.source_start for p in session.pairs} and \
                    len(pairs) < len(session.pairs):
                pairs.append([[], []])
            pairs[-1][0].extend(e.token_ids)
        elif isinstance(e, (Write, BlankRun)):
            pairs[-1][1].extend(e.token_ids)
        elif isinstance(e, Evicted):
            evictions += 1
            gone.update(range(e.first, e.last + 1))
            kept = [p for i, p in enumerate(pairs) if i not in gone]
            source = [*template.prefix_ids, *(t for p in kept for t in p[0])]
            assert session.source_ids == source
            target = [*template.header_ids, *(t for p in kept[:-1] for t in p[1])]
            assert engine.fed == target
            assert engine.shared.n_source in (len(source), len(source) - len(kept[-1][0]))
            assert engine.shared.n_target == len(engine.fed) - 1
            assert session.context == len(source) + len(engine.fed)
    # Some short documents never evict (the pair being read and the one before it stay):
    # those examples check nothing here.
    assume(evictions)


@SETTINGS
@given(words=documents, k=st.integers(1, 3), engine=st.sampled_from(["fused", "incremental"]))
def test_a_new_turn_starts_from_the_conversation_as_the_template_writes_it(llama, tok, words,
                                                                           k, engine):
    """At each later sentence's first read, the cache holds exactly the conversation so far
    (its keys equal a fresh prefill of it, so no slot of the turn before is left behind),
    and that conversation decodes to the chat template's own rendering of the finished
    pairs (user: sentence, assistant: what was written) and the new sentence so far."""
    from mlx_lm.models.cache import make_prompt_cache

    from simulref.prompt import DEFAULT_SYSTEM

    session = Longform(llama, tok, words, k=k, max_tokens_per_word=2, context_budget=10_000,
                       max_history=None,
                       engine=engine)
    run = session._run
    checked = 0
    for e, pairs in turn_chunks(session, session.events()):
        if not (isinstance(e, Read) and len(pairs) > 1 and
                e.source_index == session.pairs[-1].source_start):
            continue
        fresh = make_prompt_cache(llama)
        llama(mx.array([session.source_ids]), cache=fresh)
        n = len(session.source_ids)
        assert run.engine.shared.length == run.engine.shared.n_source == n
        for ours, theirs in zip(run.engine.caches, fresh, strict=True):
            assert mx.abs(ours.keys[..., :n, :] - theirs.keys[..., :n, :]).max().item() < 1e-4
            assert mx.abs(ours.values[..., :n, :] - theirs.values[..., :n, :]).max().item() \
                < 1e-4
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}]
        for source, target in pairs[:-1]:
            messages += [{"role": "user", "content": tok.decode(source)},
                         {"role": "assistant", "content": tok.decode(target)}]
        messages.append({"role": "user", "content": tok.decode(pairs[-1][0])})
        rendered = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=False)
        text = run.template.decode(session.source_ids + list(run.template.suffix_ids))
        assert text == rendered
        checked += 1
    assume(checked)


def test_the_guard_ends_a_sentence_the_model_never_ends(tok):
    words = "The dog runs. A cat sits.".split()
    _, events = run(looping_model(tok), tok, words, k=1)
    done = [e for e in events if isinstance(e, SentenceDone)]
    assert [len(s.target_words) for s in done] == [2 * 3 + 10, 2 * 3 + 10]
    assert events[-1] == Finish("max_new_words", events[-1].t)


def test_an_eos_ends_the_stream_when_the_input_is_over(tok):
    table = token_table(tok)
    word = next(i for i in range(len(table.pieces))
                if table.opens_word(i) and table.has_content(i))
    eos = tok.eos_token_id
    model = successor_model(len(tok), {word: eos}, word)
    _, events = run(model, tok, "Hello there.", k=1)
    assert isinstance(events[-2], SentenceDone) and isinstance(events[-3], DroppedEos)
    assert events[-1].reason == "eos"


def test_unpunctuated_input_is_cut_into_sentences(llama, tok):
    session, events = run(llama, tok, ["word"] * 10, k=1, max_sentence_words=4,
                          max_tokens_per_word=2)
    assert [len(s.source_words) for s in session.sentences] == [4, 4, 2]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@settings(SETTINGS, max_examples=5)
@given(words=documents, k=st.integers(1, 2))
def test_rotate_gives_the_reprefill_run_on_one_layer(tok, arch, words, k):
    """Through the decoder: on a one-layer model (where rotation is exact, see
    test_evict) the fast path's run and logits are the twin's."""
    model = one_layer_model(arch, 7, vocab_size=len(tok))
    logits = {"rotate": [], "reprefill": []}
    events = {}
    for method in logits:
        def record(forward, method=method):
            if forward.logits is not None:
                logits[method].append(forward.logits)
        session, events[method] = run(model, tok, words, k=k, max_tokens_per_word=2,
                                      context_budget=48, eviction=method, on_forward=record)
        assert session.eviction == method
    assert strip(events["rotate"]) == strip(events["reprefill"])
    assume(any(isinstance(e, Evicted) for e in events["rotate"]))  # else nothing to check
    assert len(logits["rotate"]) == len(logits["reprefill"])
    for a, b in zip(logits["rotate"], logits["reprefill"], strict=True):
        assert mx.abs(a - b).max().item() < 1e-3


def test_memory_and_positions_stay_bounded_over_hundreds_of_sentences(tok):
    words = "The dog runs. A cat sits. We go.".split() * 100  # 300 sentences
    session = Longform(looping_model(tok), tok, words, k=1, context_budget=120,
                       max_history=None)
    peaks = []
    for e in session.events():
        if isinstance(e, SentenceDone) and e.index % 30 == 29:
            peaks.append((session.peak_slots, session.peak_position,
                          session._run.engine.caches[0].keys.shape[2]))
    assert len(session.sentences) == 300
    # One pair (3 words, the guard's 16 target words) plus the budget bounds everything.
    assert all(p == peaks[1] for p in peaks[1:]), peaks
    assert session.peak_slots <= 120 + 40 and session.peak_position <= 120 + 40
    assert peaks[-1][2] == 256


def test_a_model_that_cannot_rotate_falls_back_and_says_so(tok):
    session = Longform(looping_model(tok), tok, "A b.", eviction="rotate")
    assert session.eviction == "reprefill"
    assert session.settings("m").option("eviction_fallback")
    assert session.settings("m").option("longform") is True


def test_bad_arguments_are_named(llama, tok):
    for kwargs, name in [(dict(context_budget=0), "context_budget"),
                         (dict(evict_to=2000), "evict_to"),
                         (dict(eviction="lru"), "eviction"),
                         (dict(layout="interleaved"), "layout"),
                         (dict(engine="reencode"), "engine"),
                         (dict(max_new_words=3), "max_new_words"),
                         (dict(max_sentence_words=0), "max_sentence_words"),
                         (dict(max_history=-1), "max_history"),
                         (dict(max_history=True), "max_history"),
                         (dict(policy=LocalAgreement(2)), "policy: LocalAgreement")]:
        with pytest.raises(ValueError, match=name):
            stream_longform(llama, tok, "a b", **kwargs)
    with pytest.raises(TypeError, match="words"):
        stream_longform(llama, tok, 5)


def test_a_document_decodes_with_its_own_sentences_and_scores(llama, tok):
    from simulref.documents import build_documents
    from simulref.longform import translate_document
    from simulref.longform_metrics import longform_scores

    pairs = [("the dog runs", "le chien court"), ("a cat sits here", "un chat"),
             ("we go home", "nous rentrons")]  # no punctuation: the splitter would not cut
    (document,) = build_documents(pairs, 3)
    output, session = translate_document(llama, tok, document, k=2, max_tokens_per_word=2,
                                         context_budget=40)
    assert [s.source for s in session.sentences] == [p[0] for p in pairs]
    assert output.words == tuple(w for s in session.sentences for w in s.target_words)
    assert list(output.delays) == sorted(output.delays)
    scores = longform_scores([output])
    assert scores["sentences"] == 3 and "LongYAAL" in scores
    with pytest.raises(ValueError, match="sentence_starts"):
        Longform(llama, tok, "a b", sentence_starts=[2, 1])


def test_a_real_tiny_model_stays_bounded_too(llama, tok):
    """The same bound through the tiny llama (RoPE positions, real attention), 90
    sentences of 3 words: at most the budget plus two pairs (each at most its words'
    tokens and the guard's 16 words of 2 tokens), whatever the stream's length."""
    words = "The dog runs. A cat sits. We go.".split() * 30
    session = Longform(llama, tok, words, k=1, max_tokens_per_word=2, context_budget=100,
                       max_history=None)
    evictions = sum(isinstance(e, Evicted) for e in session.events())
    assert len(session.sentences) == 90 and evictions > 20
    bound = 100 + 2 * (3 * 4 + 16 * 2)
    assert session.peak_slots <= bound and session.peak_position <= bound
    assert session._run.engine.caches[0].keys.shape[2] <= 256


@SETTINGS
@given(words=documents, k=st.integers(1, 3), budget=st.sampled_from([60, 1024]))
def test_an_observing_policy_runs_long_form_and_a_look_changes_nothing(llama, tok, words, k,
                                                                       budget):
    """Per sentence, a policy that looks but decides as wait-k gives wait-k's long-form
    run (evictions included); Confidence runs to the end, sentence by sentence."""
    from simulref.trace import Look

    _, looked = run(llama, tok, words, policy=LookingWaitK(k), context_budget=budget)
    _, plain = run(llama, tok, words, policy=WaitK(k), context_budget=budget)
    assert any(isinstance(e, Look) for e in looked)
    assert strip(e for e in looked if not isinstance(e, Look)) == strip(plain)
    session, events = run(llama, tok, words, policy=Confidence(0.5), context_budget=budget)
    assert isinstance(events[-1], Finish)
    assert len(session.sentences) == sum(isinstance(e, SentenceDone) for e in events) >= 1
