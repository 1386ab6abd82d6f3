"""Our outputs in omnisteval's input formats (pure; the cross-checks feed them to it)."""

from __future__ import annotations

import pytest

from simulref.longform_metrics import Document
from simulref.omnisteval_format import MILLI, longform_inputs, shortform_instance
from simulref.trace import Finish, Read, Settings, Trace, Write

SETTINGS = Settings(model="m", k=1, layout="group", system="s")


def test_a_shortform_instance_pairs_each_word_with_its_delay():
    events = (Read(0, "a", (1,), 0.1), Write(0, " de la", (2,), 0.2),
              Read(1, "b", (3,), 0.3), Write(1, "\n", (4,), 0.35),
              Write(2, " maison", (5,), 0.5), Finish("eos", 0.6))
    trace = Trace(SETTINGS, ("a", "b"), events)
    line = shortform_instance(trace, "la maison")
    assert line == {"prediction": "de la maison", "reference": "la maison",
                    "source_length": 2, "delays": [1, 1, 2]}
    timed = shortform_instance(trace, "la maison", word_duration=0.5)
    # elapsed in source words: d + compute / w
    assert timed["elapsed"] == pytest.approx([1 + 0.2 / 0.5, 1 + 0.2 / 0.5, 2 + 0.5 / 0.5])
    empty = Trace(SETTINGS, ("a",), (Read(0, "a", (1,)), Finish("eos")))
    assert shortform_instance(empty, "x", word_duration=0.5)["elapsed"] == []
    with pytest.raises(TypeError, match="reference must be a str"):
        shortform_instance(trace, None)


def test_longform_inputs_of_two_documents():
    one = Document(("a b", "c"), ("x y", "z"), ("x", "y", "z"), (1, 2, 3), (1.5, 2.5, 3.5))
    two = Document(("d",), ("w",), (), ())
    segmentation, references, hypotheses = longform_inputs([one, two])
    assert segmentation == [{"wav": "doc0.wav", "offset": 0, "duration": 2},
                            {"wav": "doc0.wav", "offset": 2, "duration": 1},
                            {"wav": "doc1.wav", "offset": 0, "duration": 1}]
    assert references == ["x y", "z", "w"]
    assert hypotheses == [
        {"source": "doc0.wav", "prediction": "x y z", "delays": [MILLI, 2 * MILLI, 3 * MILLI],
         "elapsed": [1.5 * MILLI, 2.5 * MILLI, 3.5 * MILLI]},
        {"source": "doc1.wav", "prediction": "", "delays": []},
    ]
    named = longform_inputs([two], names=["talk.wav"])
    assert named[0][0]["wav"] == named[2][0]["source"] == "talk.wav"


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: longform_inputs(Document(("a",), ("x",), (), ())), TypeError, "sequence of Doc"),
        (lambda: longform_inputs(["d"]), TypeError, r"documents\[0\] must be a Document"),
        (lambda: longform_inputs([Document(("a",), ("x",), (), ())] * 2, names=["a", "a"]),
         ValueError, "2 distinct names"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
