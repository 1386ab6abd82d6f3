"""prompt.py: chat-format discovery, templates and segmented prompts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulref import prompt as prompt_module
from simulref.prompt import (
    DEFAULT_SYSTEM,
    ChatFormat,
    ChatFormatError,
    Prompt,
    TurnBreak,
    assemble,
    discover_chat_format,
    discover_turn_break,
    template_for,
)
from simulref.testing import CHATML_TEMPLATE as CHATML_TEMPLATE_TEXT
from simulref.testing import tiny_tokenizer

# Chat templates written for these tests from the documented prompt formats of each family.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] == 'system' %}"
    "{% set body = 'Cutting Knowledge Date: December 2023\\n\\n' + message['content'] | trim %}"
    "{% else %}{% set body = message['content'] | trim %}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + body"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Gemma 2: no system role; the template refuses one.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Gemma 3: no system role either, but the template folds it into the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] | trim + '\\n\\n' %}"
    "{% set rest = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GEMMA_SPECIALS = ("<bos>", "<start_of_turn>", "<end_of_turn>")

# Qwen2.5: ChatML with a default system prompt when none is given.
QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + QWEN_DEFAULT + "<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHATML = ChatFormat(
    prefix="<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n",
    suffix="<|im_end|>\n",
    header="<|im_start|>assistant\n",
)
GEMMA = ChatFormat(
    prefix="<bos><start_of_turn>user\n{system}\n\n",
    suffix="<end_of_turn>\n",
    header="<start_of_turn>model\n",
    system_placement="user_turn",
)
EXPECTED_FORMATS = {
    "chatml": CHATML,
    "chatml-300": CHATML,
    "qwen2.5": CHATML,
    "llama3": ChatFormat(
        prefix="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\n\n{system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n",
        suffix="<|eot_id|>",
        header="<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "gemma2": GEMMA,
    "gemma3": GEMMA,
}


@pytest.fixture(scope="session")
def tokenizers(tiny_tok, retemplate):
    return {
        "chatml": tiny_tok,
        "chatml-300": tiny_tokenizer(vocab_size=300),
        "qwen2.5": retemplate(tiny_tok, QWEN25_TEMPLATE),
        "llama3": retemplate(tiny_tok, LLAMA3_TEMPLATE, special_tokens=LLAMA3_SPECIALS,
                             bos_token="<|begin_of_text|>"),
        "gemma2": retemplate(tiny_tok, GEMMA2_TEMPLATE, special_tokens=GEMMA_SPECIALS,
                             bos_token="<bos>"),
        "gemma3": retemplate(tiny_tok, GEMMA3_TEMPLATE, special_tokens=GEMMA_SPECIALS,
                             bos_token="<bos>"),
    }


NAMES = list(EXPECTED_FORMATS)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)


def rendered_chat(tokenizer, system: str, words) -> str:
    """The tokenizer's own rendering of the chat (no generation prompt); for templates that
    refuse a system role, the instruction is folded into the user turn as documented."""
    user = " ".join(words)
    try:
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            tokenize=False, add_generation_prompt=False)
    except Exception:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": system + "\n\n" + user}],
            tokenize=False, add_generation_prompt=False)


# ---------------------------------------------------------------- strategies

ANY_CHAR = st.characters(blacklist_categories=("Cs",))
SPECIAL_WORDS = ["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<start_of_turn>", "{system}"]
INTERESTING_WORDS = [
    "Translate", "the", "following", "English", "paragraph", "to", "French", "Translate:",
    ",", ".", "...", "!?", "(", ")", "\"", "'", "-", "—", "42", "3.14", "2025", "0",
    "Übersetze", "l'utilisateur", "aujourd'hui", "日本語", "🙂", "x" * 200, "\x00", "\u200b",
    *SPECIAL_WORDS,
]
random_words = st.text(ANY_CHAR, min_size=1, max_size=20).map(lambda s: "".join(s.split()))
words_strategy = st.one_of(
    st.sampled_from(INTERESTING_WORDS),
    random_words.filter(bool),
    st.text("0123456789", min_size=1, max_size=12),
    st.text(".,;:!?()[]{}'\"-", min_size=1, max_size=6),
)
random_systems = st.text(ANY_CHAR, min_size=1, max_size=60).map(str.strip).filter(bool)
systems_strategy = st.one_of(
    st.just(DEFAULT_SYSTEM),
    random_systems,
    random_systems.map(lambda s: ("Translate " + s).strip()),
    st.sampled_from(["Translate", "Translate:", "the", ",", "Translate the following",
                     "Traduis en français.\n\nSois bref.", "{system} {}", "<|im_end|>"]),
)


@st.composite
def instruction_and_words(draw):
    system = draw(systems_strategy)
    words = draw(st.lists(words_strategy, min_size=1, max_size=8))
    # Words equal to instruction words, and instructions equal to a source word.
    if draw(st.booleans()):
        words += system.split()[:3]
    if draw(st.booleans()):
        system = words[0]
    return system, words


PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- discovery


def test_prompt_module_does_not_import_mlx():
    # Load the file on its own, so what the package __init__ imports does not count.
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('p', sys.argv[1]); "
            "m = sys.modules['p'] = u.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(m for m in sys.modules if 'mlx' in m))")
    out = subprocess.run([sys.executable, "-c", code, prompt_module.__file__],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", NAMES)
def test_discovered_format_matches_the_documented_format(tokenizers, name):
    assert discover_chat_format(tokenizers[name]) == EXPECTED_FORMATS[name]


def test_discovery_accepts_the_hf_tokenizer_and_the_wrapper(tiny_tok):
    hf = tiny_tok._tokenizer
    assert discover_chat_format(hf) == discover_chat_format(tiny_tok)
    assert assemble(hf, "a b", system="s") == assemble(tiny_tok, "a b", system="s")


def test_our_system_text_replaces_a_default_system_prompt(tokenizers):
    prompt = assemble(tokenizers["qwen2.5"], "Hello world", system=DEFAULT_SYSTEM)
    assert "Qwen" not in prompt.text
    assert prompt.text.startswith("<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n")
    assert prompt.text.count("<|im_start|>system") == 1


EXPECTED_BREAKS = {
    "chatml": TurnBreak("<|im_end|>\n", "<|im_start|>user\n"),
    "llama3": TurnBreak("<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n"),
    "gemma2": TurnBreak("<end_of_turn>\n", "<start_of_turn>user\n"),
}
EXPECTED_BREAKS["chatml-300"] = EXPECTED_BREAKS["qwen2.5"] = EXPECTED_BREAKS["chatml"]
EXPECTED_BREAKS["gemma3"] = EXPECTED_BREAKS["gemma2"]


@pytest.mark.parametrize("name", NAMES)
def test_a_turn_break_rebuilds_the_templates_own_conversation(tokenizers, name):
    """prefix, user 1, suffix, header, assistant, close, open, user 2, suffix is the chat
    template's rendering of that conversation, for every family."""
    tokenizer = tokenizers[name]
    chat_format = discover_chat_format(tokenizer)
    turn = discover_turn_break(tokenizer, chat_format)
    assert turn == EXPECTED_BREAKS[name]
    first = [{"role": "system", "content": "Do it"}, {"role": "user", "content": "one two"}]
    if chat_format.system_placement == "user_turn":
        first = [{"role": "user", "content": "Do it\n\none two"}]
    rendered = tokenizer.apply_chat_template(
        first + [{"role": "assistant", "content": "un deux"},
                 {"role": "user", "content": "three"}], tokenize=False,
        add_generation_prompt=False)
    ours = (chat_format.render_prefix("Do it") + "one two" + chat_format.suffix +
            chat_format.header + "un deux" + turn.close + turn.open + "three" +
            chat_format.suffix)
    assert ours == rendered
    close, opening = turn.ids(tokenizer)
    assert decode(tokenizer, close) == turn.close and decode(tokenizer, opening) == turn.open


TURNLESS_TEMPLATES = {
    "one turn only": (
        "{% if messages | length > 2 %}{{ raise_exception('one turn') }}{% endif %}"
        + CHATML_TEMPLATE_TEXT),
    "assistant turns end differently": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ '</a>' }}{% else %}{{ '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "later turns differ from the first": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{{ '<|im_end|>\\n' if loop.index < 3 else '<|im_end|>\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}


@pytest.mark.parametrize("why", list(TURNLESS_TEMPLATES))
def test_a_template_without_a_second_turn_says_so(tiny_tok, retemplate, why):
    tokenizer = retemplate(tiny_tok, TURNLESS_TEMPLATES[why])
    chat_format = discover_chat_format(tokenizer)
    with pytest.raises(ChatFormatError, match="second turn.*turns=False"):
        discover_turn_break(tokenizer, chat_format)


BROKEN_TEMPLATES = {
    "no template": None,
    "ignores add_generation_prompt": (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"),
    "drops the content": "{% for m in messages %}{{ m['role'] + '\\n' }}{% endfor %}",
    "alters the content": (
        "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"),
    "system after the user turn": (
        "{% for m in messages | reverse %}{{ m['role'] + ':' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"),
    "content twice": (
        "{% for m in messages %}{{ m['content'] + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"),
    "always raises": "{{ raise_exception('no') }}",
    "generation prompt raises": (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ raise_exception('no') }}{% endif %}"),
    "header not a continuation": (
        "{% if add_generation_prompt %}A:{% endif %}"
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] }}{% endfor %}"),
    "literal {system} in the template": (
        "{system}{% for m in messages %}{{ m['role'] + ':' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"),
}


@pytest.mark.parametrize("why", list(BROKEN_TEMPLATES))
def test_an_unsplittable_template_raises_and_asks_for_an_explicit_format(tiny_tok, retemplate,
                                                                          why):
    tokenizer = retemplate(tiny_tok, BROKEN_TEMPLATES[why])
    with pytest.raises(ChatFormatError, match="chat_format=ChatFormat"):
        discover_chat_format(tokenizer)
    with pytest.raises(ValueError, match="chat_format"):
        assemble(tokenizer, "a b", system="s")


def test_an_explicit_format_needs_no_template(tiny_tok, retemplate):
    bare = retemplate(tiny_tok, None)
    prompt = assemble(bare, "Hello world", system="Do it", chat_format=CHATML)
    assert prompt == assemble(tiny_tok, "Hello world", system="Do it")


def test_discovery_rejects_a_non_tokenizer():
    with pytest.raises(TypeError, match="tokenizer"):
        discover_chat_format("not a tokenizer")


@pytest.mark.parametrize("kwargs, error", [
    (dict(prefix="no slot", suffix="", header=""), ValueError),
    (dict(prefix="{system}{system}", suffix="", header=""), ValueError),
    (dict(prefix="{system}", suffix="", header="", system_placement="left"), ValueError),
    (dict(prefix="{system}", suffix=None, header=""), TypeError),
    (dict(prefix=b"{system}", suffix="", header=""), TypeError),
])
def test_chat_format_validates_its_fields(kwargs, error):
    with pytest.raises(error, match="ChatFormat"):
        ChatFormat(**kwargs)


def test_chat_format_keeps_literal_braces():
    fmt = ChatFormat(prefix="{{x}} {system} {}", suffix="", header="")
    assert fmt.render_prefix("a {b}") == "{{x}} a {b} {}"


# ---------------------------------------------------------------- template


def test_template_ids_and_word_ids(tiny_tok):
    template = template_for(tiny_tok, system=DEFAULT_SYSTEM)
    encode = lambda text: tuple(tiny_tok.encode(text, add_special_tokens=False))  # noqa: E731
    assert template.prefix_ids == encode(CHATML.render_prefix(DEFAULT_SYSTEM))
    assert template.suffix_ids == encode("<|im_end|>\n")
    assert template.header_ids == encode("<|im_start|>assistant\n")
    assert template.word_ids(0, "weather") == encode("weather")
    assert template.word_ids(3, "weather") == encode(" weather")
    assert all(isinstance(i, int) for i in template.prefix_ids)


def test_template_equality_ignores_the_tokenizer_callables(tiny_tok):
    a = template_for(tiny_tok, system="s")
    b = template_for(tiny_tok._tokenizer, system="s")
    assert a == b and hash(a) == hash(b)
    assert "encode" not in repr(a)
    assert a != template_for(tiny_tok, system="t")


def test_a_template_without_tokenizer_says_so(tiny_tok):
    bare = dataclasses.replace(template_for(tiny_tok, system="s"), encode=None, decode=None)
    with pytest.raises(TypeError, match="without a tokenizer"):
        bare.word_ids(0, "a")
    prompt = dataclasses.replace(assemble(tiny_tok, "a", system="s"), template=bare)
    with pytest.raises(TypeError, match="without a tokenizer"):
        _ = prompt.text


@pytest.mark.parametrize("index, word, error", [
    (-1, "a", ValueError), (True, "a", ValueError), (1.0, "a", ValueError),
    (0, "a b", ValueError), (0, "", ValueError), (0, 7, TypeError),
])
def test_word_ids_rejects_bad_input(tiny_tok, index, word, error):
    with pytest.raises(error):
        template_for(tiny_tok, system="s").word_ids(index, word)


def test_a_word_the_tokenizer_drops_entirely_is_refused():
    # Real vocabularies lack some byte tokens (SmolLM2 lacks 21, e.g. b"\x06"); the
    # tokenizer then drops those bytes silently, and a word made of them has no tokens.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = [c for c in pre_tokenizers.ByteLevel.alphabet() if c != "\u0106"]  # b"\x06"
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert tokenizer.encode("\x06", add_special_tokens=False) == []
    with pytest.raises(ValueError, match=r"source\[0\].*no tokens"):
        assemble(tokenizer, ["\x06", "b"], system="s", chat_format=CHATML)
    prompt = assemble(tokenizer, ["a", "\x06"], system="s", chat_format=CHATML)
    assert len(prompt.segments[2]) == 1  # " \x06" keeps its space


# ---------------------------------------------------------------- properties of assemble


def check_prompt(tokenizer, prompt: Prompt, system: str, words) -> None:
    fmt = prompt.template.chat_format
    n = len(words)
    # Spans tile the ids exactly, in order, N+2 of them.
    assert len(prompt.spans) == n + 2
    assert prompt.spans[0][0] == 0 and prompt.spans[-1][1] == len(prompt.ids)
    for (_, end), (start, _) in zip(prompt.spans, prompt.spans[1:], strict=False):
        assert end == start
    assert all(start <= end for start, end in prompt.spans)
    assert prompt.words == tuple(words)
    # Segment 0 is the whole instruction, tokenized as one piece; it ends exactly where the
    # instruction text ends, so no instruction token can lie in a later segment.
    start, end = prompt.spans[0]
    prefix_text = fmt.render_prefix(system)
    assert system in prefix_text
    assert prompt.ids[start:end] == tuple(tokenizer.encode(prefix_text, add_special_tokens=False))
    assert decode(tokenizer, prompt.ids[start:end]) == prefix_text
    assert decode(tokenizer, prompt.ids[end:]) == " ".join(words) + fmt.suffix
    # Each word segment decodes back to its word (with its leading space after the first).
    for i, word in enumerate(words):
        start, end = prompt.spans[i + 1]
        assert end > start
        assert decode(tokenizer, prompt.ids[start:end]) == (word if i == 0 else " " + word)
    start, end = prompt.spans[-1]
    assert decode(tokenizer, prompt.ids[start:end]) == fmt.suffix
    # The whole prompt is the tokenizer's own rendering of the chat.
    assert prompt.text == rendered_chat(tokenizer, system, words)
    assert prompt.header_ids == tuple(tokenizer.encode(fmt.header, add_special_tokens=False))


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(case=instruction_and_words())
def test_assemble_keeps_the_instruction_whole_and_the_words_apart(tokenizers, name, case):
    system, words = case
    tokenizer = tokenizers[name]
    check_prompt(tokenizer, assemble(tokenizer, words, system=system), system, words)


@PROPERTY
@given(case=instruction_and_words())
def test_a_string_source_is_split_on_whitespace(tiny_tok, case):
    system, words = case
    text = "\n ".join(words) + " \t"
    assert assemble(tiny_tok, text, system=system) == assemble(tiny_tok, words, system=system)


def test_default_instruction_example(tiny_tok):
    prompt = assemble(tiny_tok, "The weather is nice today.", system=DEFAULT_SYSTEM)
    assert [decode(tiny_tok, s) for s in prompt.segments[1:]] == [
        "The", " weather", " is", " nice", " today.", "<|im_end|>\n"]
    assert decode(tiny_tok, prompt.segments[0]).count(DEFAULT_SYSTEM) == 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("source, error, match", [
    ("", ValueError, "at least one word"),
    (" \n\t ", ValueError, "at least one word"),
    ([], ValueError, "at least one word"),
    (["a", 3], TypeError, r"source\[1\]"),
    (["a", None], TypeError, r"source\[1\]"),
    (["a", "b c"], ValueError, r"source\[1\].*whitespace"),
    (["a\n"], ValueError, r"source\[0\].*whitespace"),
    (["a", ""], ValueError, r"source\[1\]"),
    (b"a b", TypeError, "source"),
    (None, TypeError, "source"),
    (42, TypeError, "source"),
])
def test_assemble_rejects_bad_sources(tiny_tok, source, error, match):
    with pytest.raises(error, match=match):
        assemble(tiny_tok, source, system=DEFAULT_SYSTEM)


@pytest.mark.parametrize("system, error", [
    (None, TypeError), (3, TypeError), (["Translate"], TypeError),
    ("", ValueError), ("  \n", ValueError), (" Translate", ValueError), ("Translate\n", ValueError),
])
def test_assemble_rejects_bad_systems(tiny_tok, system, error):
    with pytest.raises(error, match="system"):
        assemble(tiny_tok, "a b", system=system)


def test_system_is_keyword_only_and_required(tiny_tok):
    with pytest.raises(TypeError):
        assemble(tiny_tok, "a b", DEFAULT_SYSTEM)  # type: ignore[misc]
    with pytest.raises(TypeError):
        assemble(tiny_tok, "a b")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        template_for(tiny_tok, DEFAULT_SYSTEM)  # type: ignore[misc]


def test_assemble_rejects_a_bad_chat_format(tiny_tok):
    with pytest.raises(TypeError, match="chat_format"):
        assemble(tiny_tok, "a", system="s", chat_format="<|im_start|>{system}")


@pytest.mark.parametrize("word", ["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
def test_a_word_spelled_like_a_control_token_stays_text(tiny_tok, word):
    prompt = assemble(tiny_tok, ["Hello", word, "world"], system=DEFAULT_SYSTEM)
    special = {tiny_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>",
                                                            "<|endoftext|>")}
    for start, end in prompt.spans[1:-1]:
        assert not special & set(prompt.ids[start:end])
    start, end = prompt.spans[2]
    assert decode(tiny_tok, prompt.ids[start:end]) == " " + word
