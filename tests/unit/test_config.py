"""DecodeConfig: the one home of the decode options, checked once, producing Settings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref.config import ENGINES, LAYOUTS, DecodeConfig
from simulref.policy import ReadAll, Scripted


@pytest.mark.parametrize("options, error, match", [
    ({"k": 0}, ValueError, "k: expected an int >= 1"),
    ({"k": True}, TypeError, "k: expected an int"),
    ({"layout": "diagonal"}, ValueError, "layout: expected one of"),
    ({"target_start": -1}, ValueError, "target_start: expected 'auto' or an int"),
    ({"target_start": 3, "layout": "interleaved"}, ValueError, "group' layout only"),
    ({"max_tokens_per_word": 0}, ValueError, "max_tokens_per_word: expected an int >= 1"),
    ({"max_new_words": -1}, ValueError, "max_new_words: expected an int >= 0 or None"),
    ({"stop_at_first_eos": 1}, TypeError, "stop_at_first_eos: expected a bool"),
    ({"sampler": 3}, TypeError, "sampler: expected a callable"),
    ({"policy": object()}, TypeError, "policy: expected an object with a decide"),
    ({"engine": "turbo"}, ValueError, "engine: expected one of"),
    ({"engine": "prefilled", "layout": "interleaved"}, ValueError, "needs the 'group' layout"),
    ({"engine": "incremental", "layout": "reencode"}, ValueError, "does not go with"),
    ({"system": ""}, ValueError, "system: expected a non-empty instruction"),
    ({"system": " Translate"}, ValueError, "system: expected no leading"),
])
def test_bad_options_are_refused_when_the_config_is_made(options, error, match):
    with pytest.raises(error, match=match):
        DecodeConfig(**options)


def test_of_replaces_fields_and_names_unknown_options():
    base = DecodeConfig(k=2, max_tokens_per_word=7)
    assert DecodeConfig.of(base) is base
    assert DecodeConfig.of(base, k=5) == DecodeConfig(k=5, max_tokens_per_word=7)
    with pytest.raises(TypeError, match="unexpected decode option.*lag"):
        DecodeConfig.of(base, lag=3)
    with pytest.raises(TypeError, match="config: expected a DecodeConfig"):
        DecodeConfig.of({"k": 3})


@given(layout=st.sampled_from(LAYOUTS), engine=st.sampled_from(ENGINES), known=st.booleans())
def test_the_engine_that_runs(layout, engine, known):
    try:
        config = DecodeConfig(layout=layout, engine=engine)
    except ValueError:
        return
    ran = config.engine_for(known)
    if layout == "reencode":
        assert ran == "reencode"
    elif engine == "auto" and layout == "group":
        assert ran == ("prefilled" if known else "fused")
    elif engine == "auto":
        assert ran == "incremental"
    else:
        assert ran == engine


def test_settings_record_the_options_policy_and_engine():
    s = DecodeConfig(k=4, max_new_words=9).settings("tiny", engine="prefilled", adapter="a")
    assert (s.model, s.k, s.layout, s.max_new_words) == ("tiny", 4, "group", 9)
    assert dict(s.extra) == {"policy": "wait-4", "sampler": "greedy", "engine": "prefilled",
                             "adapter": "a"}
    assert DecodeConfig(policy=ReadAll()).settings("m").k is None
    assert DecodeConfig(policy=Scripted((1, 2))).settings("m").option("policy") == "scripted"
    assert DecodeConfig(sampler=lambda x: x).settings("m").option("sampler") == "custom"


@pytest.mark.parametrize("engine, known, ok", [
    ("prefilled", True, True), ("prefilled", False, False),
    ("fused", False, True), ("fused", True, False),
    ("auto", True, True), ("auto", False, True),
    ("incremental", True, True), ("incremental", False, True),
])
def test_an_engine_for_the_other_kind_of_source_is_refused_before_a_model_loads(
        engine, known, ok):
    """Issue 21, item 2: `translate TEXT --engine fused`, `watch --engine prefilled` (and
    eval --engine fused) crashed after the model loaded; the rule is to refuse, with the
    check the decoder makes, before anything is loaded."""
    config = DecodeConfig(engine=engine)
    if ok:
        config.check_source(known)
    else:
        want = "a source known up front" if engine == "prefilled" else "a live source"
        with pytest.raises(ValueError, match=rf"engine: '{engine}' needs {want}"):
            config.check_source(known)
